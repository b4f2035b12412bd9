"""The iptables driver: one IptablesTable per (table, IP version) reconciles our cali-*
chains and the hook rules that jump to them from the built-in chains (Felix's "Table").

How apply() tells ours from others: every rule we write carries a comment id, which
iptables_rules.py makes and reads back; iptables_diff.py turns the read (or remembered)
table and the desired chains into one batch.

Everything one apply() changes goes to the kernel in ONE `<backend>-restore --noflush`
call, which both backends commit atomically per table: a refused batch changes nothing.
We never touch a chain outside cali-* except our own hook rules at the top of the
built-in chains.

Limitation (documented, as in Felix): a rule edited by hand that keeps our exact comment
id is not noticed; deleted, moved or added rules, and whole chains, are put back.

Between resyncs the table trusts its own view (as Felix's Table does): after a successful
restore it knows exactly which ids its chains and hooks hold, so an incremental apply
(full=False, the agent's passes between resync timer ticks) plans against that view and
runs no `-save`, and only re-checks the chains whose rules changed since the view was
made.  What can make the view stale, and what happens then:
  - someone edits, flushes or deletes our chains or hooks between resyncs: not seen until
    the next full apply (the resync timer), which reads the table and repairs it.  Until
    then an edit planned on the stale view either fails (a rule number out of range, a
    chain that is gone: the view is dropped and the batch re-planned from a fresh read,
    in the same apply) or lands on the edited chain by position; the resync repairs it.
  - a foreign rule starts jumping to a chain we delete: the `-X` fails, same re-read.
  - built-in chains are shared with other writers (kube-proxy inserts at the top), so hook
    edits are never planned from the view: a pass that must move hooks reads first.
Any failed restore, and any exception, drops the view; a full apply always reads.
"""
from __future__ import annotations

import logging
import threading

from felix_agent.calc.desired import Hook
from felix_agent.dataplane.backend import command
from felix_agent.dataplane.cmd import CommandError, run
from felix_agent.dataplane.iptables_diff import TableChanges, advance, plan
from felix_agent.dataplane.iptables_rules import BUILTINS, CheckedChain, SavedTable, check_chains, parse_save

log = logging.getLogger(__name__)

RESTORE_ATTEMPTS = 2  # a batch built from a stale read (someone edited in between) is retried once
# (a batch built from the cached view gets one more attempt: its failure costs no read)
LOCK_WAIT_SECONDS = 10

class IptablesTable:
    """Reconciles one iptables table (of one IP version, in one namespace).

    set_desired() validates (only the chains whose rules changed) and stores.  apply()
    plans against the table's contents, computes the difference and writes it in one
    `<backend>-restore --noflush` call.  apply(full=True) reads `<backend>-save -t <table>`
    first and repairs whatever drifted; apply(full=False) plans against the view kept from
    the last successful apply when there is one (see the module docstring).
    Thread-safe: one lock serialises set_desired() and apply().
    """

    def __init__(self, table: str, backend: str, netns: str | None = None, ip_version: int = 4):
        if table not in BUILTINS:
            raise ValueError(f"unknown iptables table {table!r}; expected one of {', '.join(BUILTINS)}")
        self.table = table
        self.backend = backend
        self.netns = netns
        self.ip_version = ip_version
        self.save_cmd = command(backend, "save", ip_version)  # validates backend + version
        self.restore_cmd = command(backend, "restore", ip_version)
        self._lock = threading.Lock()
        self._chains: dict[str, list[tuple[str, str]]] = {}
        self._checked: dict[str, CheckedChain] = {}  # the accepted desired chains, for re-validation
        self._hooks: list[Hook] = []
        # The table as it is after our last successful apply, and the desired rule lists
        # (by identity: set_desired() keeps the list of an unchanged chain) it was made from.
        self._view: SavedTable | None = None
        self._view_of: dict[str, list[tuple[str, str]]] = {}
        self.reads = 0  # `-save` runs, for tests and figures
        self.last_batch: str = ""  # the last restore input, for logs and tests

    # -- desired state --

    def set_desired(self, chains: dict[str, tuple[str, ...]], hooks: list[Hook] | tuple[Hook, ...] = ()) -> None:
        """Replace the whole desired state of this table.  Raises ValueError on bad input
        (leaving the previous desired state in place)."""
        with self._lock:
            known = self._checked
        checked = check_chains(self.table, chains, hooks, known)
        with self._lock:
            self._checked = checked
            self._chains = {name: c.rules for name, c in checked.items()}
            self._hooks = list(hooks)

    # -- reading --

    def read(self) -> SavedTable:
        self.reads += 1
        res = run([self.save_cmd, "-t", self.table], netns=self.netns)
        return parse_save(res.stdout, self.table)

    # -- reconciling --

    def apply(self, full: bool = True) -> TableChanges:
        with self._lock:
            use_view = not full and self._view is not None
            last_error: CommandError | None = None
            for attempt in range(RESTORE_ATTEMPTS + (1 if use_view else 0)):
                if use_view:
                    saved = self._view
                    in_sync = {n for n, rules in self._chains.items() if self._view_of.get(n) is rules}
                else:
                    self._view = None  # until this read-based apply succeeds
                    saved = self.read()
                    in_sync = set()
                lines, changes = plan(self.table, saved, self._chains, self._hooks, in_sync)
                if use_view and changes.hooks_rewritten:
                    # Others insert into built-in chains too: positions there come from a read.
                    use_view = False
                    continue
                if not lines:
                    self._remember(saved)
                    return changes
                batch = "\n".join([f"*{self.table}", *lines, "COMMIT", ""])
                self.last_batch = batch
                changes.batch_lines = len(lines)
                self._view = None  # the batch may land or not: no view until we know
                try:
                    run([self.restore_cmd, "--noflush", f"--wait={LOCK_WAIT_SECONDS}"],
                        netns=self.netns, input=batch)
                except CommandError as e:
                    last_error = e
                    log.warning("%s restore failed (attempt %d, planned from %s), re-reading: %s", self.table,
                                attempt + 1, "the cached view" if use_view else "a fresh read", e)
                    use_view = False
                    continue
                changes.restore_calls = 1
                for c in changes.chains_flushed_kept:
                    log.warning("chain %s is no longer wanted but a foreign rule jumps to it: flushed, kept", c)
                self._remember(advance(saved, self._chains, self._hooks, changes))
                return changes
            if last_error is None:  # only possible with RESTORE_ATTEMPTS < 1
                raise RuntimeError(f"{self.table}: no restore attempt made")
            raise last_error

    def _remember(self, saved: SavedTable) -> None:
        self._view = saved
        self._view_of = dict(self._chains)
