"""The ipset driver: reconciles the IP sets whose names start with our prefix.

One `ipset save` read, one `ipset restore -exist` batch per phase (a batch that only
changes a few members goes over netlink instead: ipset_netlink.py).  Sets are referenced
by iptables rules, and the kernel refuses to destroy a set a rule still uses, so the
work is split in two phases around the iptables update.  The agent must call, in order:

    ipsets.apply_updates()     # create missing sets, fix members (new rules may use them)
    <every IptablesTable>.apply()
    ipsets.apply_deletions()   # destroy sets of ours no rule needs any more

A set whose type or family changed cannot simply be re-created while a rule uses it.  If
the kernel can swap the two kinds (same dimensions and family), the new contents are
built in a temporary set and swapped in (rules keep matching throughout).  Otherwise an
unreferenced set is destroyed and re-created in the batch; a referenced one is reported
in `failed` and left alone (the calc names sets so that this does not happen).

ipset restore stops at the first refused line and keeps what it did before, so a bad
member is refused in set_desired() (clear error, nothing changed) rather than mid-batch.

Between resyncs the driver trusts its own view, like the iptables tables: after a
successful restore it knows every set of ours and its members, so the phases called with
full=False plan against that view instead of running `ipset save` / `ipset list -n` (whose
output grows with every member on the node).  A set edited, created or destroyed by
someone else between resyncs is seen and repaired on the next full pass (the resync timer).
A batch planned from a stale view that the kernel refuses (e.g. adding to a set someone
destroyed) drops the view and is re-planned from a fresh read in the same call; any other
failure drops the view too, so the next pass reads.
"""
from __future__ import annotations

import logging
import threading

from felix_agent.calc.desired import IpSet
from felix_agent.dataplane.cmd import CommandError, run
from felix_agent.dataplane.ipset_netlink import IpsetNetlink, member_ops
from felix_agent.dataplane.ipsets_diff import (
    NAME_RE, NETLINK_MAX_OPS, IpsetChanges, SavedSet, advance_updates, check_sets, dims, parse_save,
    plan_updates, swap_compatible,
)

log = logging.getLogger(__name__)


class IpsetDriver:
    """Reconciles the ipsets named <prefix>* in one namespace.  Thread-safe."""

    def __init__(self, netns: str | None = None, prefix: str = "cali"):
        if not prefix or not NAME_RE.match(prefix):
            raise ValueError(f"bad ipset name prefix {prefix!r}")
        self.netns = netns
        self.prefix = prefix
        self._lock = threading.Lock()
        self._desired: dict[str, IpSet] = {}
        self._members: dict[str, frozenset[str]] = {}
        # Our sets as they are after our last successful restore (None: read before planning).
        self._view: dict[str, SavedSet] | None = None
        self.reads = 0  # `ipset save` / `ipset list -n` runs, for tests and figures
        self.last_batch = ""
        self.netlink = IpsetNetlink(netns)

    def set_desired(self, sets: dict[str, IpSet]) -> None:
        """Replace the desired sets.  Raises ValueError on bad input, keeping the old state."""
        with self._lock:
            old, old_members = self._desired, self._members
        members = check_sets(self.prefix, sets, old, old_members)
        with self._lock:
            self._desired = dict(sets)
            self._members = members

    def read(self) -> dict[str, SavedSet]:
        self.reads += 1
        return parse_save(run(["ipset", "save"], netns=self.netns).stdout, self.prefix)

    def referenced(self) -> set[str]:
        """Our sets with a non-zero reference count (in use by iptables rules)."""
        out = run(["ipset", "list", "-t"], netns=self.netns).stdout
        refs: set[str] = set()
        name = ""
        for line in out.splitlines():
            if line.startswith("Name: "):
                name = line[6:].strip()
            elif line.startswith("References: ") and name.startswith(self.prefix):
                if int(line.split(":", 1)[1]) > 0:
                    refs.add(name)
        return refs

    def _restore(self, lines: list[str]) -> None:
        self.last_batch = "\n".join(lines) + "\n"
        run(["ipset", "restore", "-exist"], netns=self.netns, input=self.last_batch)

    def _write(self, lines: list[str], ch: IpsetChanges) -> None:
        """One batch: over netlink when it only changes a few members, else one restore."""
        kinds = {n: (",".join(dims(s.type)), s.family) for n, s in self._desired.items()}
        ops = member_ops(lines, kinds, NETLINK_MAX_OPS)
        if ops is None:
            self._restore(lines)
            ch.restore_calls = 1
            return
        self.last_batch = "\n".join(lines) + "\n"
        try:
            self.netlink.apply(ops, kinds)
        except CommandError as e:
            # restore is the authority: it redoes the batch (-exist: what netlink already
            # did is no error) and, if the kernel refuses, says why in the tool's words.
            log.info("ipset members over netlink failed, running restore: %s", e)
            self._restore(lines)
            ch.restore_calls = 1
            return
        ch.netlink_ops = len(ops)

    def apply_updates(self, full: bool = True) -> IpsetChanges:
        """Phase 1 (before iptables): create missing sets, fix members, swap changed kinds.
        full=False plans against the cached view when there is one."""
        with self._lock:
            use_view = not full and self._view is not None
            while True:
                actual = self._view if use_view else self.read()
                self._view = None  # until this phase has succeeded
                referenced = None
                needs_refs = any(
                    (a := actual.get(n)) is not None and (a.type, a.family) != (s.type, s.family)
                    and not swap_compatible(a.type, a.family, s.type, s.family)
                    for n, s in self._desired.items())
                if needs_refs:
                    referenced = self.referenced()
                lines, ch = plan_updates(self.prefix, actual, self._desired, self._members, referenced)
                if lines:
                    try:
                        self._write(lines, ch)
                    except CommandError as e:
                        if not use_view:
                            raise
                        # Someone changed our sets since the view was made: read and redo
                        # (restore keeps what it did before the refused line; the read sees it).
                        log.warning("ipset batch planned from the cached view failed, re-reading: %s", e)
                        use_view = False
                        continue
                    actual = advance_updates(self.prefix, actual, self._desired, self._members, ch)
                self._view = actual
                for name, why in ch.failed.items():
                    log.error("ipset %s not updated: %s", name, why)
                return ch

    def apply_deletions(self, full: bool = True) -> IpsetChanges:
        """Phase 2 (after iptables): destroy our sets that are no longer desired.

        A set still referenced by some rule is skipped and reported in `failed`; the
        rest are destroyed in one batch.  full=False takes the names of our sets from
        the cached view when there is one.
        """
        with self._lock:
            ch = IpsetChanges()
            if not full and self._view is not None:
                names = list(self._view)
            else:
                self.reads += 1
                names = run(["ipset", "list", "-n"], netns=self.netns).stdout.split()
            stale = sorted(n for n in names if n.startswith(self.prefix) and n not in self._desired)
            if not stale:
                return ch
            in_use = self.referenced()
            for n in stale:
                if n in in_use:
                    ch.failed[n] = "still referenced by iptables rules"
                    log.warning("ipset %s is no longer wanted but still in use; kept", n)
            doomed = [n for n in stale if n not in in_use]
            if doomed:
                try:
                    self._restore([f"destroy {n}" for n in doomed])
                except CommandError as e:  # raced with a new reference: next apply retries
                    log.warning("destroying stale ipsets failed: %s", e)
                    ch.failed.update({n: str(e) for n in doomed})
                    self._view = None  # some may be gone: the next pass reads
                    return ch
                ch.restore_calls = 1
                ch.destroyed = doomed
                if self._view is not None:
                    self._view = {n: v for n, v in self._view.items() if n not in doomed}
            return ch

    def apply(self, full: bool = True) -> IpsetChanges:
        """Both phases, for callers with no iptables rules in between (tests, tools)."""
        up = self.apply_updates(full)
        down = self.apply_deletions(full)
        up.destroyed, up.restore_calls = down.destroyed, up.restore_calls + down.restore_calls
        up.failed.update(down.failed)
        return up
