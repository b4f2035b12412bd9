"""Our ipsets as text (pure; ipsets.py runs it): members in the kernel's canonical form,
`ipset save` read back, and the `ipset restore` batches of the two phases, planned against
a read or against the driver's view of what it last wrote."""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field

from felix_agent.calc.desired import IpSet

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
NAME_RE = re.compile(r"^[A-Za-z0-9_.:+-]+$")
_PROTOS = ("tcp", "udp", "sctp", "udplite", "icmp", "icmpv6")


# --- members --------------------------------------------------------------------------

def dims(set_type: str) -> list[str]:
    return set_type.split(":", 1)[1].split(",")


@functools.lru_cache(maxsize=65536)
def canonical_member(member: str, set_type: str, family: str) -> str:
    """The form `ipset save` prints for a member, so desired and actual compare equal.

    Raises ValueError for a member the set cannot hold (wrong family, bad address, ...).
    Cached: the same members come back on every pass, and ipaddress parsing is slow.
    """
    parts = member.strip().split(",")
    want = dims(set_type)
    if len(parts) != len(want):
        raise ValueError(f"member {member!r} has {len(parts)} parts; {set_type} needs {len(want)}")
    version = 4 if family == "inet" else 6
    out = []
    for part, dim in zip(parts, want):
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
        ds = dims(t)
        return (tuple("ip" if d == "net" else d for d in ds), "net" in ds)
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


# --- checking desired sets ----------------------------------------------------------------

def check_sets(prefix: str, sets: dict[str, IpSet], old: dict[str, IpSet],
               old_members: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Set name -> its members in canonical form; ValueError on anything ipset restore
    would refuse mid-batch.  Sets equal to `old`'s keep their member frozenset, so
    planning can skip them by identity."""
    members: dict[str, frozenset[str]] = {}
    for key, s in sets.items():
        if not isinstance(s, IpSet):
            raise ValueError(f"{key!r}: {s!r} is not an IpSet")
        if key != s.name:
            raise ValueError(f"set keyed {key!r} is named {s.name!r}")
        if not s.name.startswith(prefix) or not NAME_RE.match(s.name):
            raise ValueError(f"set name {s.name!r} must start with {prefix!r} "
                             "(letters, digits, _ . : + -)")
        if s.name.startswith(temp_name(prefix, "")[: len(prefix) + 4]):
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
    return members
