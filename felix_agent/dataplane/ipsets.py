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

import functools
import hashlib
import ipaddress
import logging
import re
import threading
from dataclasses import dataclass, field

from felix_agent.calc.desired import IpSet
from felix_agent.dataplane.cmd import CommandError, run
from felix_agent.dataplane.ipset_netlink import IpsetNetlink, member_ops

log = logging.getLogger(__name__)

MAX_NAME_LEN = 31  # IPSET_MAXNAMELEN 32 including the NUL
MAXELEM = 1 << 20  # room to grow: a hash set's memory follows its members, not maxelem
# A batch of at most this many member changes (no creates, swaps or destroys) goes over
# netlink (ipset_netlink.py) instead of an `ipset restore` run: ~0.15 ms an entry against
# 1-2.5 ms a run, so netlink wins up to a dozen entries or so; a pod's ADD changes a few.
NETLINK_MAX_OPS = 16
FAMILIES = ("inet", "inet6")
# Types we create (each dimension is ip | net | port | iface).  Only these: this
# kernel (6.18, Debian 12 userland) lacks hash:mac, hash:ip,mac, hash:ip,mark, hash:net,net.
TYPES = ("hash:ip", "hash:net", "hash:ip,port", "hash:net,port", "hash:ip,port,ip",
         "hash:ip,port,net", "hash:net,iface", "bitmap:port")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]+$")
_PROTOS = ("tcp", "udp", "sctp", "udplite", "icmp", "icmpv6")


# --- members --------------------------------------------------------------------------

def _dims(set_type: str) -> list[str]:
    return set_type.split(":", 1)[1].split(",")


@functools.lru_cache(maxsize=65536)
def canonical_member(member: str, set_type: str, family: str) -> str:
    """The form `ipset save` prints for a member, so desired and actual compare equal.

    Raises ValueError for a member the set cannot hold (wrong family, bad address, ...).
    Cached: the same members come back on every pass, and ipaddress parsing is slow.
    """
    parts = member.strip().split(",")
    dims = _dims(set_type)
    if len(parts) != len(dims):
        raise ValueError(f"member {member!r} has {len(parts)} parts; {set_type} needs {len(dims)}")
    version = 4 if family == "inet" else 6
    out = []
    for part, dim in zip(parts, dims):
        part = part.strip()
        if dim == "ip":
            addr = ipaddress.ip_address(part.split("/")[0]) if "/" not in part else None
            if addr is None:  # "1.2.3.4/32" is a plain address; a real range is not
                net = ipaddress.ip_network(part, strict=False)
                if net.prefixlen != net.max_prefixlen:
                    raise ValueError(f"member {member!r}: {set_type} holds addresses, not networks")
                addr = net.network_address
            if addr.version != version:
                raise ValueError(f"member {member!r} is IPv{addr.version}; the set's family is {family}")
            out.append(str(addr))
        elif dim == "net":
            net = ipaddress.ip_network(part, strict=False)
            if net.version != version:
                raise ValueError(f"member {member!r} is IPv{net.version}; the set's family is {family}")
            out.append(str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net))
        elif dim == "port":
            proto, _, port = part.rpartition(":")
            if proto and set_type == "bitmap:port":
                raise ValueError(f"member {member!r}: {set_type} holds bare port numbers")
            proto = (proto or "tcp").lower()
            if proto not in _PROTOS:
                raise ValueError(f"member {member!r}: unknown protocol {proto!r}")
            if not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"member {member!r}: bad port {port!r}")
            out.append(f"{proto}:{int(port)}" if set_type != "bitmap:port" else str(int(port)))
        else:  # iface
            if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,15}", part):
                raise ValueError(f"member {member!r}: bad interface name {part!r}")
            out.append(part)
    return ",".join(out)


def swap_compatible(old_type: str, old_family: str, new_type: str, new_family: str) -> bool:
    """Whether `ipset swap` accepts the two kinds: the kernel compares the type's feature
    flags (its dimensions, with ip and net alike, plus 'nomatch' for net types) and family."""
    def features(t: str) -> tuple:
        dims = _dims(t)
        return (tuple("ip" if d == "net" else d for d in dims), "net" in dims)
    return old_family == new_family and features(old_type) == features(new_type)


def temp_name(prefix: str, name: str) -> str:
    """A name for building a replacement set; it carries our prefix, so a leftover from a
    crash is ours and is cleaned up by the next apply_deletions()."""
    return f"{prefix}tmp:{hashlib.sha256(name.encode()).hexdigest()[:12]}"


# --- reading `ipset save` -------------------------------------------------------------

@dataclass
class SavedSet:
    name: str
    type: str
    family: str
    maxelem: int
    members: set[str] | frozenset[str] = field(default_factory=set)


def parse_save(text: str, prefix: str | None = None) -> dict[str, SavedSet]:
    """Sets (optionally only those named `prefix`*) from `ipset save` output."""
    sets: dict[str, SavedSet] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        verb, name = words[0], words[1] if len(words) > 1 else ""
        if prefix is not None and not name.startswith(prefix):
            continue
        if verb == "create":
            opts = dict(zip(words[3::2], words[4::2]))
            sets[name] = SavedSet(name, words[2], opts.get("family", "inet"),
                                  int(opts.get("maxelem", 65536)))
        elif verb == "add":
            if name not in sets:
                raise ValueError(f"ipset save output adds to {name!r} before creating it")
            sets[name].members.add(words[2])
        else:
            raise ValueError(f"unexpected line in ipset save output: {raw!r}")
    return sets


# --- the diff -------------------------------------------------------------------------

@dataclass
class IpsetChanges:
    """What one phase did.  Falsy when nothing changed (and no restore ran)."""

    created: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)  # type/family change, by swap or re-create
    updated: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    members_added: int = 0
    members_removed: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # set -> why it was left alone
    restore_calls: int = 0
    netlink_ops: int = 0  # member changes sent over netlink instead of a restore

    @property
    def changed(self) -> bool:
        return self.restore_calls > 0 or self.netlink_ops > 0

    def __bool__(self) -> bool:
        return self.changed


def _maxelem(s: IpSet, n_members: int) -> int:
    """The maxelem we create a set with (what `ipset save` then prints; 65536, the
    parser's default, for a bitmap, which has none)."""
    return max(MAXELEM, n_members) if s.type.startswith("hash:") else 65536


def _create_line(name: str, s: IpSet, n_members: int) -> str:
    extra = f" family {s.family}" if not s.type.startswith("bitmap:") else " range 0-65535"
    maxelem = f" maxelem {_maxelem(s, n_members)}" if s.type.startswith("hash:") else ""
    return f"create {name} {s.type}{extra}{maxelem}"


def plan_updates(prefix: str, actual: dict[str, SavedSet], desired: dict[str, IpSet],
                 members: dict[str, frozenset[str]], referenced: set[str] | None = None
                 ) -> tuple[list[str], IpsetChanges]:
    """The restore lines creating and updating sets.  `members` are desired members in
    canonical form.  `referenced` (sets in use by iptables) is only needed when a set's
    kind changed in a way `swap` cannot do; None means "assume referenced"."""
    ch = IpsetChanges()
    lines: list[str] = []
    for name in sorted(desired):
        s = desired[name]
        want = members[name]
        have = actual.get(name)
        if have is None:
            lines.append(_create_line(name, s, len(want)))
            lines.extend(f"add {name} {m}" for m in sorted(want))
            ch.created.append(name)
            ch.members_added += len(want)
            continue
        kind_ok = (have.type == s.type and have.family == s.family
                   and (not s.type.startswith("hash:") or have.maxelem >= len(want)))
        if not kind_ok:
            if swap_compatible(have.type, have.family, s.type, s.family):
                tmp = temp_name(prefix, name)
                if tmp in actual:
                    lines.append(f"destroy {tmp}")
                lines.append(_create_line(tmp, s, len(want)))
                lines.extend(f"add {tmp} {m}" for m in sorted(want))
                lines.append(f"swap {tmp} {name}")
                lines.append(f"destroy {tmp}")
            elif referenced is not None and name not in referenced:
                lines.append(f"destroy {name}")
                lines.append(_create_line(name, s, len(want)))
                lines.extend(f"add {name} {m}" for m in sorted(want))
            else:
                ch.failed[name] = (f"type/family changed from {have.type}/{have.family} to "
                                   f"{s.type}/{s.family}, the kernel cannot swap those, and "
                                   "iptables rules still use the set")
                continue
            ch.recreated.append(name)
            ch.members_added += len(want)
            ch.members_removed += len(have.members)
            continue
        if have.members is want:  # the cached view holds the very set we applied last
            continue
        add = want - have.members
        rm = have.members - want
        if add or rm:
            ch.updated.append(name)
            ch.members_added += len(add)
            ch.members_removed += len(rm)
            lines.extend(f"del {name} {m}" for m in sorted(rm))
            lines.extend(f"add {name} {m}" for m in sorted(add))
    return lines, ch


def advance_updates(prefix: str, actual: dict[str, SavedSet], desired: dict[str, IpSet],
                    members: dict[str, frozenset[str]], changes: IpsetChanges) -> dict[str, SavedSet]:
    """Our sets as they are after plan_updates()'s batch (with these `changes`) was
    restored successfully: every desired set it did not leave alone holds exactly its
    desired members.  A new dict; `actual` is not changed."""
    out = dict(actual)
    for name, s in desired.items():
        if name in changes.failed:
            continue
        want = members[name]
        have = actual.get(name)
        if have is None or name in changes.recreated:
            out[name] = SavedSet(name, s.type, s.family, _maxelem(s, len(want)), want)
            if have is not None and swap_compatible(have.type, have.family, s.type, s.family):
                out.pop(temp_name(prefix, name), None)  # built, swapped in, destroyed
        elif have.members is not want:
            out[name] = SavedSet(name, s.type, s.family, have.maxelem, want)
    return out


# --- the driver -----------------------------------------------------------------------

class IpsetDriver:
    """Reconciles the ipsets named <prefix>* in one namespace.  Thread-safe."""

    def __init__(self, netns: str | None = None, prefix: str = "cali"):
        if not prefix or not _NAME_RE.match(prefix):
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
        members: dict[str, frozenset[str]] = {}
        with self._lock:
            old, old_members = self._desired, self._members
        for key, s in sets.items():
            if not isinstance(s, IpSet):
                raise ValueError(f"{key!r}: {s!r} is not an IpSet")
            if key != s.name:
                raise ValueError(f"set keyed {key!r} is named {s.name!r}")
            if not s.name.startswith(self.prefix) or not _NAME_RE.match(s.name):
                raise ValueError(f"set name {s.name!r} must start with {self.prefix!r} "
                                 "(letters, digits, _ . : + -)")
            if s.name.startswith(temp_name(self.prefix, "")[: len(self.prefix) + 4]):
                raise ValueError(f"set name {s.name!r} uses the driver's temporary-set prefix")
            if len(s.name) > MAX_NAME_LEN:
                raise ValueError(f"set name {s.name!r} is {len(s.name)} characters; ipset allows {MAX_NAME_LEN}")
            if s.type not in TYPES:
                raise ValueError(f"set {s.name}: unsupported type {s.type!r} ({', '.join(TYPES)})")
            if s.family not in FAMILIES:
                raise ValueError(f"set {s.name}: family must be inet or inet6, not {s.family!r}")
            if s.type.startswith("bitmap:") and s.family != "inet":
                raise ValueError(f"set {s.name}: {s.type} has no family; leave it at 'inet'")
            prev = old.get(key)
            if prev is not None and (prev is s or prev == s):
                # Unchanged: keep the same frozenset, so planning can skip it by identity.
                members[s.name] = old_members[s.name]
                continue
            try:
                members[s.name] = frozenset(canonical_member(m, s.type, s.family) for m in s.members)
            except ValueError as e:
                raise ValueError(f"set {s.name}: {e}") from None
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
        kinds = {n: (",".join(_dims(s.type)), s.family) for n, s in self._desired.items()}
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
