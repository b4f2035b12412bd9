"""The iptables driver: one IptablesTable per (table, IP version) reconciles our cali-*
chains and the hook rules that jump to them from the built-in chains (Felix's "Table").

How apply() tells ours from others': every rule we write starts with
`-m comment --comment "cali:<id>"`, where <id> is a hash of the chain name, the rule body
and (for identical bodies) the body's occurrence number.  Reading `<backend>-save` back we
only need those ids, never the rule text, which iptables rewrites on the way through
("-s 1.2.3.4" comes back as "-s 1.2.3.4/32").  A rule whose body changed gets a new id,
so a per-chain diff of id lists says exactly which rules to keep, replace, insert or
delete; untouched rules keep their packet counters.

Everything one apply() changes goes to the kernel in ONE `<backend>-restore --noflush`
call, which both backends commit atomically per table: a refused batch changes nothing.
Order inside the batch: declare new chains; fix the hooks in built-in chains; edit the
chains we keep; fill the new chains; flush, then delete, the chains we no longer want
(after everything that referenced them is gone).  We never touch a chain outside cali-*
except our own hook rules at the top of the built-in chains.

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

import difflib
import functools
import hashlib
import logging
import re
import shlex
import threading
from collections.abc import Collection
from dataclasses import dataclass, field

from felix_agent.calc.desired import Hook
from felix_agent.dataplane.backend import BackendError, command
from felix_agent.dataplane.cmd import CommandError, run

log = logging.getLogger(__name__)

CHAIN_PREFIX = "cali-"
MAX_CHAIN_LEN = 28  # xtables: 29 bytes including the NUL
COMMENT_PREFIX = "cali:"
ID_LEN = 16
# Built-in chains per table, for validating hooks before the table even exists.
BUILTINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
RESTORE_ATTEMPTS = 2  # a batch built from a stale read (someone edited in between) is retried once
# (a batch built from the cached view gets one more attempt: its failure costs no read)
LOCK_WAIT_SECONDS = 10

_CHAIN_RE = re.compile(r"^cali-[A-Za-z0-9_.:+-]+$")
_ID_RE = re.compile(r'--comment "?' + re.escape(COMMENT_PREFIX) + r'([0-9a-f]{%d})"?(?:\s|$)' % ID_LEN)
_TARGET_RE = re.compile(r"(?:^|\s)-[jg] (\S+)")
_COUNTERS_RE = re.compile(r"^\[(\d+):(\d+)\]\s+")


# --- ids and rendering ----------------------------------------------------------------

def rule_id(chain: str, body: str, occurrence: int = 0) -> str:
    """The content id of a rule: same chain + body (+ nth repeat) -> same id."""
    h = hashlib.sha256(f"{chain}\0{body}\0{occurrence}".encode()).hexdigest()
    return h[:ID_LEN]


def hook_id(hook: Hook) -> str:
    return rule_id(hook.builtin, f"hook -> {hook.target}")


def chain_rule_ids(chain: str, bodies: tuple[str, ...] | list[str]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for body in bodies:
        n = seen.get(body, 0)
        seen[body] = n + 1
        ids.append(rule_id(chain, body, n))
    return ids


def tagged(rid: str, body: str) -> str:
    """A rule body with our comment first, so the id is the first thing a reader sees."""
    tag = f'-m comment --comment "{COMMENT_PREFIX}{rid}"'
    return f"{tag} {body}" if body else tag


# --- reading iptables-save ------------------------------------------------------------

@dataclass(frozen=True)
class SavedRule:
    chain: str
    body: str  # the text after "-A <chain> ", as iptables-save printed it
    rule_id: str | None  # our comment id, None for a rule without one
    packets: int | None = None  # with `-save -c`
    bytes: int | None = None

    @property
    def target(self) -> str | None:
        m = _TARGET_RE.search(self.body)
        return m.group(1) if m else None


@dataclass
class SavedTable:
    name: str
    policies: dict[str, str] = field(default_factory=dict)  # chain -> policy ("-" for user chains)
    rules: dict[str, list[SavedRule]] = field(default_factory=dict)  # chain -> rules in order

    @property
    def builtins(self) -> list[str]:
        return [c for c, p in self.policies.items() if p != "-"]

    @property
    def chains(self) -> list[str]:
        return list(self.policies)


def parse_save(text: str, table: str) -> SavedTable:
    """Parse the `*<table>` section of iptables-save output (other tables are skipped).

    A table that does not exist yet yields an empty SavedTable.
    """
    out = SavedTable(table)
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            inside = line[1:] == table
            continue
        if not inside:
            continue
        if line == "COMMIT":
            inside = False
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            out.policies[parts[0]] = parts[1] if len(parts) > 1 else "-"
            out.rules.setdefault(parts[0], [])
            continue
        packets = nbytes = None
        m = _COUNTERS_RE.match(line)
        if m:
            packets, nbytes = int(m.group(1)), int(m.group(2))
            line = line[m.end():]
        if not line.startswith("-A "):
            raise ValueError(f"unexpected line in {table} save output: {raw!r}")
        _, chain, *rest = line.split(" ", 2)
        body = rest[0] if rest else ""
        idm = _ID_RE.search(body)
        out.rules.setdefault(chain, []).append(
            SavedRule(chain, body, idm.group(1) if idm else None, packets, nbytes))
        out.policies.setdefault(chain, "-")
    return out


def is_ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


def is_our_hook_rule(rule: SavedRule) -> bool:
    """In a built-in chain: a rule with our comment, or any jump/goto into a cali- chain
    (an untagged leftover would otherwise pin a chain we want to delete)."""
    t = rule.target
    return rule.rule_id is not None or (t is not None and is_ours(t))


# --- the diff -------------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    """One iptables-restore line against a chain, with 1-based rule numbers valid at the
    moment the line runs (the batch is ordered so earlier edits don't shift later ones)."""

    op: str  # "D" | "I" | "R" | "A"
    chain: str
    pos: int = 0  # unused for "A"
    rid: str = ""
    body: str = ""

    def render(self) -> str:
        if self.op == "D":
            return f"-D {self.chain} {self.pos}"
        if self.op == "A":
            return f"-A {self.chain} {tagged(self.rid, self.body)}"
        return f"-{self.op} {self.chain} {self.pos} {tagged(self.rid, self.body)}"


def diff_chain(chain: str, actual: list[str | None], desired: list[tuple[str, str]]) -> list[Edit]:
    """Minimal edits turning the actual id list into the desired (id, body) list.

    Identical rules are kept in place (their counters survive).  Opcodes are emitted from
    the end of the chain backwards so each edit's rule numbers are still right when it runs.
    A rule without our id (someone else's, inside our chain) never matches, so it goes.
    """
    want = [rid for rid, _ in desired]
    # Unique stand-ins for untagged rules: each is a distinct "unwanted" element.
    have = [rid if rid is not None else f"?{i}" for i, rid in enumerate(actual)]
    if have == want:
        return []
    edits: list[Edit] = []
    sm = difflib.SequenceMatcher(a=have, b=want, autojunk=False)
    for tag, i1, i2, j1, j2 in reversed(sm.get_opcodes()):
        if tag == "equal":
            continue
        n_old, n_new = i2 - i1, j2 - j1
        common = min(n_old, n_new) if tag == "replace" else 0
        for k in range(common):
            rid, body = desired[j1 + k]
            edits.append(Edit("R", chain, i1 + k + 1, rid, body))
        for pos in range(i2, i1 + common, -1):  # surplus old rules, last first
            edits.append(Edit("D", chain, pos))
        for k in range(common, n_new):  # missing new rules, in order
            rid, body = desired[j1 + k]
            edits.append(Edit("I", chain, i1 + k + 1, rid, body))
    return edits


def diff_hooks(builtin: str, actual: list[SavedRule], desired: list[Hook]) -> list[Edit]:
    """Keep our hooks as the first rules of `builtin`, in the desired order.

    If they already are, nothing; otherwise remove every rule of ours in the chain and
    insert the hooks at 1..n (hooks are few; moving them all is simpler and still atomic).
    """
    want = [hook_id(h) for h in desired]
    ours = [(i + 1, r) for i, r in enumerate(actual) if is_our_hook_rule(r)]
    if [pos for pos, _ in ours] == list(range(1, len(want) + 1)) and [r.rule_id for _, r in ours] == want:
        return []
    edits = [Edit("D", builtin, pos) for pos, _ in reversed(ours)]
    for k, h in enumerate(desired):
        edits.append(Edit("I", builtin, k + 1, want[k], f"-j {h.target}"))
    return edits


@dataclass
class TableChanges:
    """What one apply() did.  Falsy when nothing changed (and no restore ran)."""

    table: str
    chains_created: list[str] = field(default_factory=list)
    chains_deleted: list[str] = field(default_factory=list)
    chains_updated: list[str] = field(default_factory=list)
    # chains we no longer want but someone else's rule still jumps to: flushed, kept
    chains_flushed_kept: list[str] = field(default_factory=list)
    hooks_rewritten: list[str] = field(default_factory=list)  # built-in chains
    rules_inserted: int = 0
    rules_deleted: int = 0
    rules_replaced: int = 0
    restore_calls: int = 0
    batch_lines: int = 0

    @property
    def changed(self) -> bool:
        return self.restore_calls > 0

    def __bool__(self) -> bool:
        return self.changed

    def count(self, edits: list[Edit]) -> None:
        for e in edits:
            if e.op == "R":
                self.rules_replaced += 1
            elif e.op == "D":
                self.rules_deleted += 1
            else:
                self.rules_inserted += 1


def plan(table: str, saved: SavedTable, chains: dict[str, list[tuple[str, str]]],
         hooks: list[Hook], in_sync: Collection[str] = ()) -> tuple[list[str], TableChanges]:
    """The restore lines (without *table/COMMIT) that bring `saved` to the desired state.

    `in_sync`: chains the caller knows `saved` already holds exactly as desired (the
    cached view, for chains whose rules did not change); they are not diffed.
    """
    ch = TableChanges(table)
    declare: list[str] = []
    hook_lines: list[str] = []
    edit_lines: list[str] = []
    fill_lines: list[str] = []
    cleanup: list[str] = []

    existing_ours = [c for c in saved.chains if is_ours(c) and saved.policies.get(c) == "-"]
    for name, rules in chains.items():
        if name in in_sync:
            continue
        if name not in saved.policies:
            declare.append(f":{name} - [0:0]")
            ch.chains_created.append(name)
            edits = [Edit("A", name, 0, rid, body) for rid, body in rules]
            ch.count(edits)
            fill_lines.extend(e.render() for e in edits)
        else:
            actual = [r.rule_id for r in saved.rules.get(name, [])]
            edits = diff_chain(name, actual, rules)
            if edits:
                ch.chains_updated.append(name)
                ch.count(edits)
                edit_lines.extend(e.render() for e in edits)

    builtins = set(saved.builtins) | {h.builtin for h in hooks}
    for b in sorted(builtins):
        want = [h for h in hooks if h.builtin == b]
        edits = diff_hooks(b, saved.rules.get(b, []), want)
        if edits:
            ch.hooks_rewritten.append(b)
            ch.count(edits)
            hook_lines.extend(e.render() for e in edits)

    stale = [c for c in existing_ours if c not in chains]
    if stale:
        foreign_refs = {
            r.target for c, rules in saved.rules.items()
            if not is_ours(c) and c not in builtins for r in rules
        }
        # Flush every stale chain before deleting any: they may jump to each other.
        for c in stale:
            n = len(saved.rules.get(c, []))
            if n:
                ch.rules_deleted += n
                cleanup.append(f"-F {c}")
        for c in stale:
            if c in foreign_refs:
                # Deleting would fail the whole batch.  Kept empty; once flushed it
                # produces no lines, so later applies stay no-ops.
                if saved.rules.get(c):
                    ch.chains_flushed_kept.append(c)
                    log.warning("chain %s is no longer wanted but a foreign rule jumps to it: "
                                "flushed, kept", c)
            else:
                cleanup.append(f"-X {c}")
                ch.chains_deleted.append(c)
    return declare + hook_lines + edit_lines + fill_lines + cleanup, ch


def advance(saved: SavedTable, chains: dict[str, list[tuple[str, str]]], hooks: list[Hook],
            changes: TableChanges) -> SavedTable:
    """`saved` as it is after the batch plan() made from it (with these `changes`) was
    restored successfully.  Updated in place (only what the batch touched) and returned.

    Our chains then hold exactly the desired ids, the rewritten built-in chains our hooks
    on top followed by their other rules; stale chains are gone or (kept for a foreign
    reference) empty.  Rule bodies are stored as we wrote them, not as `-save` would
    print them: planning needs only the ids and, in built-in chains, the jump targets.
    """
    for name in (*changes.chains_created, *changes.chains_updated):
        saved.policies.setdefault(name, "-")
        saved.rules[name] = [SavedRule(name, tagged(rid, body), rid) for rid, body in chains[name]]
    for b in changes.hooks_rewritten:
        others = [r for r in saved.rules.get(b, []) if not is_our_hook_rule(r)]
        ours = [SavedRule(b, tagged(hook_id(h), f"-j {h.target}"), hook_id(h)) for h in hooks if h.builtin == b]
        saved.rules[b] = ours + others
    # Stale chains were flushed, then deleted or (a foreign rule jumps there) kept empty;
    # a stale chain that was empty already is in neither list and stays as it was.
    for c in changes.chains_deleted:
        saved.policies.pop(c, None)
        saved.rules.pop(c, None)
    for c in changes.chains_flushed_kept:
        saved.rules[c] = []
    return saved


# --- the driver -----------------------------------------------------------------------

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
                self._remember(advance(saved, self._chains, self._hooks, changes))
                return changes
            if last_error is None:  # only possible with RESTORE_ATTEMPTS < 1
                raise RuntimeError(f"{self.table}: no restore attempt made")
            raise last_error

    def _remember(self, saved: SavedTable) -> None:
        self._view = saved
        self._view_of = dict(self._chains)


@functools.lru_cache(maxsize=65536)
def _words(body: str) -> tuple[str, ...]:
    """shlex.split, cached: the same rule bodies come back on every pass, and splitting
    12k of them took ~0.3 s per pass."""
    return tuple(shlex.split(body))


@dataclass(frozen=True)
class CheckedChain:
    """One desired chain that passed the checks: its bodies as given, (id, body) pairs,
    and the cali- chains its rules jump to (checked against the whole desired set)."""

    bodies: tuple[str, ...]
    rules: list[tuple[str, str]]
    targets: frozenset[str]


def check_chain(name: str, bodies: tuple[str, ...]) -> CheckedChain:
    """Everything about one chain that does not depend on the other chains."""
    if not isinstance(name, str) or not _CHAIN_RE.match(name):
        raise ValueError(f"chain name {name!r} is not ours: chains must be named cali-* "
                         "(letters, digits, _ . : + -)")
    if len(name) > MAX_CHAIN_LEN:
        raise ValueError(f"chain name {name!r} is {len(name)} characters; iptables allows {MAX_CHAIN_LEN}")
    if isinstance(bodies, str):
        raise ValueError(f"chain {name}: rules must be a tuple of rule bodies, not one string")
    bodies = tuple(bodies)
    targets = set()
    for body in bodies:
        if not isinstance(body, str):
            raise ValueError(f"chain {name}: rule body {body!r} is not a string")
        if "\n" in body or "\0" in body or "\r" in body:
            raise ValueError(f"chain {name}: rule body {body!r} spans lines")
        try:
            words = _words(body)
        except ValueError as e:
            raise ValueError(f"chain {name}: rule body {body!r}: {e}") from None
        if words and words[0] in ("-A", "-I", "-D", "-R", "-N", "-X", "-F", "-P"):
            raise ValueError(f"chain {name}: rule body {body!r} must be the text after '-A {name} '")
        for i, w in enumerate(words[:-1]):
            if w in ("-j", "-g", "--jump", "--goto") and is_ours(words[i + 1]):
                targets.add(words[i + 1])
    return CheckedChain(bodies, list(zip(chain_rule_ids(name, bodies), bodies)), frozenset(targets))


def check_chains(table: str, chains: dict[str, tuple[str, ...]], hooks: list[Hook] | tuple[Hook, ...],
                 known: dict[str, CheckedChain] | None = None) -> dict[str, CheckedChain]:
    """Check names, bodies and hooks; chain -> CheckedChain.

    `known` (the last accepted result) saves re-checking chains whose bodies are unchanged:
    a chain's own checks depend only on its name and bodies, and its jump targets are
    checked against the new set of chains every time, so the result is as strict as
    checking everything."""
    known = known or {}
    out: dict[str, CheckedChain] = {}
    for name, bodies in chains.items():
        prev = known.get(name)
        if prev is not None and (prev.bodies is bodies or prev.bodies == bodies):
            out[name] = prev
        else:
            out[name] = check_chain(name, bodies)
    names = frozenset(out)  # once: `targets - out.keys()` would copy the keys for every chain
    for name, c in out.items():
        if c.targets and not c.targets <= names:
            missing = c.targets - names
            target = sorted(missing)[0]
            body = next(b for b in c.bodies if target in _words(b))
            raise ValueError(f"chain {name}: rule {body!r} jumps to {target}, "
                             "which is not among the desired chains")
    seen = set()
    for h in hooks:
        if not isinstance(h, Hook):
            raise ValueError(f"hook {h!r} is not a Hook")
        if h.table != table:
            raise ValueError(f"hook {h} belongs to table {h.table!r}, not {table!r}")
        if h.builtin not in BUILTINS[table]:
            raise ValueError(f"hook {h}: {h.builtin!r} is not a built-in chain of {table} "
                             f"({', '.join(BUILTINS[table])})")
        if h.target not in chains:
            raise ValueError(f"hook {h}: target chain {h.target!r} is not among the desired chains")
        if (h.builtin, h.target) in seen:
            raise ValueError(f"hook {h} is listed twice")
        seen.add((h.builtin, h.target))
    return out


def validate(table: str, chains: dict[str, tuple[str, ...]],
             hooks: list[Hook] | tuple[Hook, ...]) -> dict[str, list[tuple[str, str]]]:
    """Check names and bodies; return chain -> [(id, body)]."""
    return {name: c.rules for name, c in check_chains(table, chains, hooks).items()}


__all__ = [
    "BackendError", "CheckedChain", "Edit", "IptablesTable", "SavedRule", "SavedTable", "TableChanges",
    "advance", "chain_rule_ids", "check_chain", "check_chains", "diff_chain", "diff_hooks", "hook_id",
    "parse_save", "plan", "rule_id", "tagged", "validate",
]
