"""What our iptables rules look like and how they are read back, for iptables.py's Table.

Every rule we write starts with `-m comment --comment "cali:<id>"`, where <id> is a hash
of the chain name, the rule body and (for identical bodies) the body's occurrence number.
Reading `<backend>-save` back we only need those ids, never the rule text, which iptables
rewrites on the way through ("-s 1.2.3.4" comes back as "-s 1.2.3.4/32").  A rule whose
body changed gets a new id, so a per-chain diff of id lists (iptables_diff.py) says exactly
which rules to keep, replace, insert or delete; untouched rules keep their packet counters.
The checks here refuse a desired chain iptables would refuse, before anything is written.
"""
from __future__ import annotations

import functools
import hashlib
import re
import shlex
from dataclasses import dataclass, field

from felix_agent.calc.desired import HOOK_POSITIONS, Hook

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
    # A top hook's id is the one it always had, so an upgrade rewrites no top hook.
    where = "hook" if hook.position == "top" else f"hook ({hook.position})"
    return rule_id(hook.builtin, f"{where} -> {hook.target}")


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
        if h.position not in HOOK_POSITIONS:
            raise ValueError(f"hook {h}: position must be one of {', '.join(HOOK_POSITIONS)}")
        if (h.builtin, h.target) in seen:
            raise ValueError(f"hook {h} is listed twice")
        seen.add((h.builtin, h.target))
    return out


def validate(table: str, chains: dict[str, tuple[str, ...]],
             hooks: list[Hook] | tuple[Hook, ...]) -> dict[str, list[tuple[str, str]]]:
    """Check names and bodies; return chain -> [(id, body)]."""
    return {name: c.rules for name, c in check_chains(table, chains, hooks).items()}
