"""One NetworkPolicy -> its shared chains cali-pi-<id> (ingress) / cali-po-<id> (egress).

A chain depends on the policy alone (never on which pods exist): peers and named ports
are matched through ipsets named by what they mean, so pods and labels coming and going
change set members, not rules.  Every endpoint the policy selects jumps to the same chain.

Each allowed (peer x port) combination is one rule that sets the accept mark, followed by
a RETURN once the mark is set; the endpoint chain then stops looking.  Input the API would
refuse (bad port, bad CIDR, unknown protocol) is skipped with an error text, always by
dropping the broken part's whole rule or peer, so a skip can only narrow what is allowed.

Each policy renders once per IP family (iptables and ip6tables, same chain names): its
selector and named-port peers name that family's sets, and an ipBlock peer exists only in
its own family's chain, so a rule whose only peers are IPv4 blocks matches no IPv6 traffic
(and the reverse), while the policy still selects its pods in both.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping

from felix_agent.calc.ipsets import NamedPortSet, NetSet, SelectorSet, SetSpec, net_members
from felix_agent.calc.names import RETURN_IF_ACCEPTED, SET_ACCEPT_MARK, policy_chain
from felix_agent.calc.rule_text import cidr_match_text, rule
from felix_agent.calc.selectors import ALL_PODS, PeerSelector
from felix_agent.model import NetworkPolicy, PolicyPeer, PolicyPort, PolicyRule

PROTOCOLS = ("TCP", "UDP", "SCTP")
MULTIPORT_MAX = 15  # iptables multiport: at most 15 ports, a range counts as two
DIRECTIONS = {"Ingress": "ingress", "Egress": "egress"}


@dataclass(frozen=True)
class PolicyChains:
    chains: Mapping[str, tuple[str, ...]]  # read-only: results are cached and shared
    sets: tuple[SetSpec, ...]  # every set the rules name, first use first
    errors: tuple[str, ...] = ()
    # chain -> for each of its lines, the index of the policy rule it came from (trace)
    rule_of: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class MatchPeer:
    """A from/to entry as match parts. `sel` is set for selector peers."""

    cidr: str = ""
    matches: tuple[str, ...] = ()
    sel: PeerSelector | None = None
    sets: tuple[SetSpec, ...] = ()


@dataclass(frozen=True)
class _Ports:
    """One port alternative: a protocol plus a port match, or a named port."""

    proto: str = ""  # lower case for iptables, "" = any protocol
    match: str = ""  # the port match text ("" = every port of proto)
    named: str = ""  # a container port name, resolved through an ipset


@dataclass
class RuleBuilder:
    """What rule lines of one policy need: who it is (for errors), the pods it selects (an
    ingress named port resolves on them) and its namespace (a bare podSelector peer picks
    pods there; "" for cluster policies, whose peers always name their namespaces)."""

    who: str
    subject: PeerSelector
    namespace: str = ""
    family: int = 4  # the chains' IP family: the sets it names, the ipBlocks it keeps
    errors: list[str] = field(default_factory=list)
    sets: dict[SetSpec, None] = field(default_factory=dict)  # ordered set

    def error(self, msg: str) -> None:
        self.errors.append(f"{self.who}: {msg}")

    def use(self, spec: SetSpec) -> str:
        self.sets.setdefault(spec, None)
        return spec.name


@lru_cache(maxsize=8192)
def policy_chains(policy: NetworkPolicy, family: int = 4) -> PolicyChains:
    """The policy's chains (one per policyType) for IP `family` and the sets they name.
    Pure and cached by value: an unchanged policy costs a dict lookup."""
    b = RuleBuilder(f"policy {policy.key}", PeerSelector.of_policy(policy), policy.namespace, family=family)
    chains: dict[str, tuple[str, ...]] = {}
    rule_of: dict[str, tuple[int, ...]] = {}
    for ptype in policy.policy_types:
        direction = DIRECTIONS.get(ptype)
        if direction is None:
            b.error(f"unknown policyType {ptype!r}; ignored")
            continue
        rules = policy.ingress if direction == "ingress" else policy.egress
        body: list[str] = []
        index: list[int] = []
        for i, r in enumerate(rules):
            for line in rule_lines(b, r, i, direction):
                body += [line + (" " if line else "") + SET_ACCEPT_MARK, RETURN_IF_ACCEPTED]
                index += [i, i]
        # No rules: an empty chain sets no mark, so the endpoint chain drops (default deny).
        chains[policy_chain(policy.id, direction)] = tuple(body)
        rule_of[policy_chain(policy.id, direction)] = tuple(index)
    return PolicyChains(MappingProxyType(chains), tuple(b.sets), tuple(b.errors), MappingProxyType(rule_of))


def rule_lines(b: RuleBuilder, r: PolicyRule, index: int, direction: str,
               more_peers: tuple[MatchPeer, ...] = ()) -> list[str]:
    """The rule's matches, one line per peer x port alternative, without a target.
    `more_peers`: peers NetworkPolicy has no form for (a cluster policy's nodes)."""
    where = f"{direction} rule {index}"
    peers = [p for p in (_peer(b, peer, direction, where) for peer in r.peers) if p is not None]
    if r.peers and not peers and not more_peers:
        return []  # every peer was of the other family or broken: this rule allows nothing here
    peers += more_peers
    ports = _merge_ports([p for p in (_port(b, port, where) for port in r.ports) if p is not None])
    if r.ports and not ports:
        return []
    lines: list[str] = []
    for peer in peers or [MatchPeer()]:
        for port in ports or [_Ports()]:
            peer_matches, peer_sets = peer.matches, peer.sets
            port_match, port_set = port.match, None
            if port.named:
                if direction == "ingress":
                    # The name resolves on the destination: the pods this policy selects.
                    port_set = NamedPortSet(b.subject, port.named, port.proto.upper(), b.family)
                elif peer.sel is not None:
                    # The destinations are the peer's pods; the set holds their ip,port
                    # pairs and so also stands in for the peer's own selector set.
                    port_set = NamedPortSet(peer.sel, port.named, port.proto.upper(), b.family)
                    peer_matches, peer_sets = (), ()
                else:
                    port_set = NamedPortSet(ALL_PODS, port.named, port.proto.upper(), b.family)
                port_match = f"-m set --match-set {port_set.name} dst,dst"
            for spec in (*peer_sets, port_set):
                if spec is not None:
                    b.use(spec)
            addr = {"src": peer.cidr} if direction == "ingress" else {"dst": peer.cidr}
            line = rule("", proto=port.proto, matches=(*peer_matches, port_match), **addr)
            if line not in lines:
                lines.append(line)
    return lines


def _merge_ports(ports: list[_Ports]) -> list[_Ports]:
    """Numeric ports of one protocol become one match (multiport when several, in chunks of
    15); numeric ports of a protocol that also allows every port are dropped as redundant."""
    whole = {p.proto for p in ports if not p.match and not p.named}
    numeric: dict[str, list[str]] = {}
    out: list[_Ports] = []
    for p in ports:
        if p.match:
            if p.proto not in whole and p.match not in numeric.setdefault(p.proto, []):
                numeric[p.proto].append(p.match)
        elif p not in out:
            out.append(p)
    for proto, specs in numeric.items():
        if len(specs) == 1:
            out.append(_Ports(proto=proto, match=f"-m {proto} --dport {specs[0]}"))
            continue
        chunk: list[str] = []
        for spec in specs + [None]:
            weight = sum(1 + (":" in s) for s in chunk)
            if spec is None or weight + 1 + (":" in spec) > MULTIPORT_MAX:
                out.append(_Ports(proto=proto, match=f"-m multiport --dports {','.join(chunk)}"
                                  if len(chunk) > 1 else f"-m {proto} --dport {chunk[0]}"))
                chunk = []
            if spec is not None:
                chunk.append(spec)
    return out


def _peer(b: RuleBuilder, peer: PolicyPeer, direction: str, where: str) -> MatchPeer | None:
    side = "src" if direction == "ingress" else "dst"
    if peer.ip_block is not None:
        try:
            net = ipaddress.ip_network(peer.ip_block.cidr, strict=False)
        except ValueError:
            b.error(f"{where}: ipBlock cidr {peer.ip_block.cidr!r} is not a CIDR; peer skipped")
            return None
        if net.version != b.family:
            return None  # a block of the other family means nothing in this family's chains
        excepts = []
        for e in peer.ip_block.except_:
            try:
                enet = ipaddress.ip_network(e, strict=False)
            except ValueError:
                b.error(f"{where}: ipBlock except {e!r} is not a CIDR; peer skipped")
                return None
            if enet.version == b.family:
                excepts.append(str(enet))
        matches: tuple[str, ...] = ()
        sets: tuple[SetSpec, ...] = ()
        if excepts:
            spec = NetSet(net_members(excepts, b.family), b.family)
            matches = (f"-m set ! --match-set {spec.name} {side}",)
            sets = (spec,)
        return MatchPeer(cidr=cidr_match_text(str(net)), matches=matches, sets=sets)
    sel = PeerSelector.of_peer(peer, b.namespace)
    if sel is None:
        b.error(f"{where}: peer has neither ipBlock nor a selector; peer skipped")
        return None
    spec = SelectorSet(sel, b.family)
    return MatchPeer(matches=(f"-m set --match-set {spec.name} {side}",), sel=sel, sets=(spec,))


def _port(b: RuleBuilder, port: PolicyPort, where: str) -> _Ports | None:
    """One ports entry; a numeric one carries just "80" or "80:90" in `match` until
    _merge_ports turns the numbers of a protocol into iptables matches."""
    if port.protocol == "" and isinstance(port.port, str) and port.port:
        # Cluster policies name a port without a protocol: the destination pod's declared
        # port of that name, whatever its protocol (the set's members carry it).
        return _Ports(named=port.port)
    if port.protocol not in PROTOCOLS:
        b.error(f"{where}: protocol {port.protocol!r} is not one of {', '.join(PROTOCOLS)}; port skipped")
        return None
    proto = port.protocol.lower()
    value = port.port
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value is None:
        if port.end_port is not None:
            b.error(f"{where}: endPort without port; port skipped")
            return None
        return _Ports(proto=proto)
    if isinstance(value, str):
        if port.end_port is not None:
            b.error(f"{where}: endPort with named port {value!r}; port skipped")
            return None
        if not value:
            b.error(f"{where}: empty port name; port skipped")
            return None
        return _Ports(proto=proto, named=value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        b.error(f"{where}: port {value!r} is not in 1-65535; port skipped")
        return None
    end = port.end_port
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or not value <= end <= 65535):
        b.error(f"{where}: endPort {end!r} must be in {value}-65535; port skipped")
        return None
    return _Ports(proto=proto, match=f"{value}:{end}" if end is not None and end != value else str(value))
