"""The difference between a table as read (or as last written) and as desired, as one
`<backend>-restore --noflush` batch (pure; iptables.py runs it).

Order inside the batch: declare new chains; fix the hooks in built-in chains; edit the
chains we keep; fill the new chains; flush, then delete, the chains we no longer want
(after everything that referenced them is gone).  We never touch a chain outside cali-*
except our own hook rules at the top (and, for "bottom" hooks, the end) of the built-in
chains.
"""
from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass, field

from felix_agent.calc.desired import Hook
from felix_agent.dataplane.iptables_rules import (
    SavedRule, SavedTable, hook_id, is_our_hook_rule, is_ours, tagged,
)


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


def hook_layout(desired: list[Hook]) -> tuple[list[Hook], list[Hook]]:
    """The top hooks and the bottom hooks of one built-in chain, each in desired order."""
    return [h for h in desired if h.position == "top"], [h for h in desired if h.position == "bottom"]


def diff_hooks(builtin: str, actual: list[SavedRule], desired: list[Hook]) -> list[Edit]:
    """Keep our top hooks as the first rules of `builtin` and our bottom hooks as its
    last, each group in the desired order.

    If they already are, nothing; otherwise remove every rule of ours in the chain, insert
    the top hooks at 1..n and append the bottom ones (hooks are few; moving them all is
    simpler and still atomic).
    """
    top, bottom = hook_layout(desired)
    ours = [(i + 1, r) for i, r in enumerate(actual) if is_our_hook_rule(r)]
    n, m, total = len(top), len(bottom), len(actual)
    want_pos = list(range(1, n + 1)) + list(range(total - m + 1, total + 1))
    if [pos for pos, _ in ours] == want_pos and [r.rule_id for _, r in ours] == [hook_id(h) for h in top + bottom]:
        return []
    edits = [Edit("D", builtin, pos) for pos, _ in reversed(ours)]
    for k, h in enumerate(top):
        edits.append(Edit("I", builtin, k + 1, hook_id(h), f"-j {h.target}"))
    for h in bottom:
        edits.append(Edit("A", builtin, 0, hook_id(h), f"-j {h.target}"))
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
            else:
                cleanup.append(f"-X {c}")
                ch.chains_deleted.append(c)
    return declare + hook_lines + edit_lines + fill_lines + cleanup, ch


def advance(saved: SavedTable, chains: dict[str, list[tuple[str, str]]], hooks: list[Hook],
            changes: TableChanges) -> SavedTable:
    """`saved` as it is after the batch plan() made from it (with these `changes`) was
    restored successfully.  Updated in place (only what the batch touched) and returned.

    Our chains then hold exactly the desired ids, the rewritten built-in chains our top
    hooks, their other rules, then our bottom hooks; stale chains are gone or (kept for a foreign
    reference) empty.  Rule bodies are stored as we wrote them, not as `-save` would
    print them: planning needs only the ids and, in built-in chains, the jump targets.
    """
    for name in (*changes.chains_created, *changes.chains_updated):
        saved.policies.setdefault(name, "-")
        saved.rules[name] = [SavedRule(name, tagged(rid, body), rid) for rid, body in chains[name]]
    for b in changes.hooks_rewritten:
        others = [r for r in saved.rules.get(b, []) if not is_our_hook_rule(r)]
        top, bottom = ([SavedRule(b, tagged(hook_id(h), f"-j {h.target}"), hook_id(h)) for h in group]
                       for group in hook_layout([h for h in hooks if h.builtin == b]))
        saved.rules[b] = top + others + bottom
    # Stale chains were flushed, then deleted or (a foreign rule jumps there) kept empty;
    # a stale chain that was empty already is in neither list and stays as it was.
    for c in changes.chains_deleted:
        saved.policies.pop(c, None)
        saved.rules.pop(c, None)
    for c in changes.chains_flushed_kept:
        saved.rules[c] = []
    return saved
