"""A tiny iptables: runs one packet through the chains the calc produced (pure, no kernel).

It understands exactly the rule grammar the calc emits (calc/rule_text.py forms: -s -d -i
-o -p, -m conntrack/set/tcp/udp/sctp/multiport/mark/icmp6, -j/-g, MARK --set-xmark) and
raises ValueError on anything else, so a new rule shape cannot be misread silently.  Every
simulated packet is the first of a new connection (conntrack state NEW).  Addresses may be
of either family: run the iptables chains with IPv4 packets and the ip6tables chains with
IPv6 ones (a -s/-d or set of the other family never matches, as in the kernel).

`tortiectl trace` runs packets through it on the very chains and ipsets the agent would
program (so its answer cannot disagree with the dataplane), and the calc's semantic tests
check those chains against an independent reading of the policy APIs with it.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Mapping

from felix_agent.calc.desired import Hook, IpSet

MAX_DEPTH = 20


@dataclass
class Packet:
    src: str
    dst: str
    proto: str  # "tcp" | "udp" | "sctp" | "ipv6-icmp"
    dport: int  # for ipv6-icmp: the ICMPv6 type
    in_iface: str = ""
    out_iface: str = ""
    mark: int = 0


@dataclass(frozen=True)
class Hit:
    """A rule that matched and had a target: chains[chain][index], entered via `stack`."""

    stack: tuple[str, ...]  # the chains from the start to `chain`, `chain` last
    index: int
    target: tuple[str, ...]  # "-j", "MARK", "--set-xmark", "0x10000/0x10000" ...

    @property
    def chain(self) -> str:
        return self.stack[-1]


@dataclass
class Run:
    """The verdict of one run: "ACCEPT", "DROP", or None (the start chain returned)."""

    verdict: str | None = None
    hits: list[Hit] = field(default_factory=list)


def _iface_match(pattern: str, iface: str) -> bool:
    return iface.startswith(pattern[:-1]) if pattern.endswith("+") else iface == pattern


def _in_set(ipset: IpSet, pkt: Packet, dirs: str) -> bool:
    if ipset.type == "hash:ip,port":
        if dirs != "dst,dst":
            raise ValueError(f"hash:ip,port matched with {dirs}")
        return f"{pkt.dst},{pkt.proto}:{pkt.dport}" in ipset.members
    if ipset.type == "hash:net,iface":  # the interface dimension: src = input, dst = output
        ip_dir, if_dir = dirs.split(",")
        ip = ipaddress.ip_address(pkt.src if ip_dir == "src" else pkt.dst)
        iface = pkt.in_iface if if_dir == "src" else pkt.out_iface
        return any(ip in ipaddress.ip_network(net) and iface == name
                   for net, name in (m.split(",") for m in ipset.members))
    ip = ipaddress.ip_address(pkt.src if dirs == "src" else pkt.dst)
    return any(ip.version == ipaddress.ip_network(m).version and ip in ipaddress.ip_network(m)
               for m in ipset.members)


def _ports(spec: str, port: int) -> bool:
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def _xmark(text: str) -> tuple[int, int]:
    v, m = (int(x, 16) for x in text.split("/"))
    return v, m


def rule_matches(tokens: list[str], pkt: Packet, ipsets: Mapping[str, IpSet]) -> tuple[bool, list[str]]:
    """Whether the match part holds; returns the target tokens."""
    i = 0
    ok = True
    while i < len(tokens) and tokens[i] not in ("-j", "-g"):
        t = tokens[i]
        if t in ("-s", "-d"):
            ip = ipaddress.ip_address(pkt.src if t == "-s" else pkt.dst)
            net = ipaddress.ip_network(tokens[i + 1])
            ok &= ip.version == net.version and ip in net
            i += 2
        elif t in ("-i", "-o"):
            ok &= _iface_match(tokens[i + 1], pkt.in_iface if t == "-i" else pkt.out_iface)
            i += 2
        elif t == "-p":
            ok &= pkt.proto == tokens[i + 1]
            i += 2
        elif t == "-m":
            mod = tokens[i + 1]
            if mod == "conntrack" and tokens[i + 2] == "--ctstate":
                ok = False  # every simulated packet is NEW
                i += 4
            elif mod == "set":
                neg = tokens[i + 2] == "!"
                j = i + 3 if neg else i + 2
                if tokens[j] != "--match-set":
                    raise ValueError(f"unknown set match in {' '.join(tokens)}")
                ok &= _in_set(ipsets[tokens[j + 1]], pkt, tokens[j + 2]) != neg
                i = j + 3
            elif mod in ("tcp", "udp", "sctp") and tokens[i + 2] == "--dport":
                ok &= pkt.proto == mod and _ports(tokens[i + 3], pkt.dport)
                i += 4
            elif mod == "multiport" and tokens[i + 2] == "--dports":
                ok &= _ports(tokens[i + 3], pkt.dport)
                i += 4
            elif mod == "icmp6" and tokens[i + 2] == "--icmpv6-type":
                ok &= pkt.proto == "ipv6-icmp" and pkt.dport == int(tokens[i + 3])
                i += 4
            elif mod == "mark" and tokens[i + 2] == "--mark":
                v, m = _xmark(tokens[i + 3])
                ok &= (pkt.mark & m) == v
                i += 4
            else:
                raise ValueError(f"unknown match -m {mod} in {' '.join(tokens)}")
        else:
            raise ValueError(f"unknown token {t} in {' '.join(tokens)}")
    return ok, tokens[i:]


def run(chains: Mapping[str, tuple[str, ...]], name: str, pkt: Packet, ipsets: Mapping[str, IpSet],
        out: Run | None = None, _stack: tuple[str, ...] = ()) -> Run:
    """Run `pkt` through chain `name` (and whatever it jumps to); `pkt.mark` changes as
    MARK rules set it.  Every matching rule with a target is recorded in `hits`."""
    out = out if out is not None else Run()
    stack = (*_stack, name)
    if len(stack) > MAX_DEPTH:
        raise ValueError(f"chain loop: {' -> '.join(stack)}")
    for index, body in enumerate(chains.get(name, ())):
        ok, target = rule_matches(body.split(), pkt, ipsets)
        if not ok or not target:
            continue
        out.hits.append(Hit(stack, index, tuple(target)))
        kind, what = target[0], target[1]
        if what in ("ACCEPT", "DROP"):
            out.verdict = what
            return out
        if what == "RETURN":
            return out
        if what == "MARK":
            if target[2] != "--set-xmark":
                raise ValueError(f"unknown MARK form {' '.join(target)}")
            v, m = _xmark(target[3])
            pkt.mark = (pkt.mark & ~m) ^ v
            continue
        run(chains, what, pkt, ipsets, out, stack)
        if out.verdict is not None or kind == "-g":
            return out
    return out


def run_builtin(chains: Mapping[str, tuple[str, ...]], hooks: tuple[Hook, ...], table: str, builtin: str,
                pkt: Packet, ipsets: Mapping[str, IpSet]) -> Run:
    """Run `pkt` through our hooks in built-in chain `builtin` of `table` as the kernel
    meets them: the top hooks, then (after other writers' rules, not ours to know) the
    bottom ones.  A verdict of None leaves the packet to the built-in chain's policy."""
    out = Run()
    for position in ("top", "bottom"):
        for h in hooks:
            if (h.table, h.builtin, h.position) == (table, builtin, position):
                run(chains, h.target, pkt, ipsets, out)
                if out.verdict is not None:
                    return out
    return out
