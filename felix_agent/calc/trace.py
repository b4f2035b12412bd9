"""Why a connection is allowed or denied: `tortiectl trace`, pure.

The answer comes from the agent's own calc: the chains and ipsets dataplane_state gives
the node(s) involved, with a first packet run through them by calc/simulate.py: the
iptables chains for an IPv4 connection, the ip6tables ones for IPv6 (the family of an
address given, or asked for; pods use their address of that family).  So the
verdict is the dataplane's by construction; the path (tier, policy, rule index) is read
off the rules the packet hit:

- the whole FORWARD path of the sender's node, and of the receiver's when it is another
  node, gives the verdict (anti-spoofing and unknown interfaces included);
- each direction's endpoint chain run on its own gives the explanation: the sender's
  egress (cali-fw-<iface>) and the receiver's ingress (cali-tw-<iface>), each evaluated
  even when the other already denies, so both reasons show.
"""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Literal, Union

from podnet.naming import host_iface_name

from felix_agent.calc.cluster import Cluster
from felix_agent.calc.filter import CalcConfig, dataplane_state
from felix_agent.calc.names import ACCEPT_MARK, PASS_MARK, from_wl_chain, to_wl_chain
from felix_agent.calc.policy import policy_chains
from felix_agent.calc.simulate import Hit, Packet, run, run_builtin
from felix_agent.calc.tier_policy import tier_policy_chains
from felix_agent.model import Endpoint

UPLINK = "eth0"  # any non-cali interface: where traffic from or to another node passes
PROTOCOLS = ("tcp", "udp", "sctp")
POLICY_CHAIN_PREFIXES = ("cali-pi-", "cali-po-", "cali-ci-", "cali-co-")

Party = Union[Endpoint, str]  # a pod's endpoint, or an address outside the pods


@dataclass(frozen=True)
class Step:
    """A policy rule that acted on the packet (in the order they did)."""

    tier: str  # "Admin" | "NetworkPolicy" | "Baseline"
    policy: str  # "ClusterNetworkPolicy/<name>", "NetworkPolicy <ns>/<name>", ...
    rule: int  # index in the policy's ingress or egress list
    action: str  # "Accept" | "Deny" | "Pass" (cluster policies), "Allow" (NetworkPolicy)
    rule_name: str = ""


    @property
    def where(self) -> str:
        """"Admin: ClusterNetworkPolicy/x", or just "NetworkPolicy ns/name"."""
        return self.policy if self.tier == "NetworkPolicy" else f"{self.tier}: {self.policy}"


@dataclass(frozen=True)
class DirectionTrace:
    direction: Literal["egress", "ingress"]
    pod: str  # the pod whose policy this is, "<ns>/<name>"
    node: str
    allowed: bool
    decided_by: str  # "Admin" | "NetworkPolicy" | "Baseline" | "default"
    reason: str
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Trace:
    src: str
    dst: str
    port: int
    protocol: str
    allowed: bool
    reason: str
    directions: tuple[DirectionTrace, ...] = ()
    family: int = 4  # the connection's IP family: which chains (iptables, ip6tables) answered

    def as_dict(self) -> dict:
        return asdict(self)


class TraceError(ValueError):
    """The question cannot be answered (a pod without address or node, a bad port)."""


@dataclass(frozen=True)
class _Policy:
    tier: str
    label: str
    rule_names: dict[str, tuple[str, ...]]  # direction -> names
    rule_of: dict[str, tuple[int, ...]]  # chain -> line -> rule index


def _policies(cluster: Cluster, family: int) -> dict[str, _Policy]:
    """Policy chain id -> what a hit in its chains of IP `family` means."""
    out: dict[str, _Policy] = {}
    for np in cluster.policies.values():
        out[np.id] = _Policy("NetworkPolicy", f"NetworkPolicy {np.key}", {},
                             dict(policy_chains(np, family).rule_of))
    for cp in cluster.cluster_policies():
        names = {d: tuple(r.name for r in getattr(cp, d)) for d in ("ingress", "egress")}
        out[cp.id] = _Policy(cp.tier, f"{cp.kind}/{cp.name}", names, dict(tier_policy_chains(cp, family).rule_of))
    return out


def _address(p: Party, family: int) -> str:
    if isinstance(p, str):
        if ipaddress.ip_address(p).version != family:
            raise TraceError(f"{p} is not an IPv{family} address (one connection has one family)")
        return p
    for ip in p.ips:
        if ipaddress.ip_address(ip).version == family:
            return ip
    raise TraceError(f"pod {p.key} has no IPv{family} address (not wired yet, or not of that family)")


def _family(src: Party, dst: Party, family: int | None) -> int:
    """The connection's IP family: asked for, or an address's, or IPv4."""
    given = [ipaddress.ip_address(p).version for p in (src, dst) if isinstance(p, str)]
    if family is None:
        return given[0] if given else 4
    if family not in (4, 6):
        raise TraceError(f"IP family {family} is not 4 or 6")
    return family


def _iface(ep: Endpoint) -> str:
    return ep.iface or host_iface_name(ep.namespace, ep.pod)


def _step(hit: Hit, pol: _Policy, direction: str) -> Step | None:
    rule = pol.rule_of[hit.chain][hit.index]
    names = pol.rule_names.get(direction, ())
    name = names[rule] if rule < len(names) else ""
    if hit.target[:2] == ("-j", "DROP"):
        return Step(pol.tier, pol.label, rule, "Deny", name)
    if hit.target[1] == "MARK":
        bits = int(hit.target[3].split("/")[0], 16)
        if bits & ACCEPT_MARK:
            return Step(pol.tier, pol.label, rule, "Allow" if pol.tier == "NetworkPolicy" else "Accept", name)
        if bits & PASS_MARK:
            return Step(pol.tier, pol.label, rule, "Pass", name)
    return None


def _filter(state, family: int):
    return (state.chains if family == 4 else state.chains6)["filter"]


def _direction(cluster_policies: dict[str, _Policy], state, ep: Endpoint, direction: str,
               pkt: Packet, family: int) -> DirectionTrace:
    chains = _filter(state, family)
    name = (from_wl_chain if direction == "egress" else to_wl_chain)(_iface(ep))
    result = run(chains, name, pkt, state.ipsets)
    steps = []
    for hit in result.hits:
        if hit.chain.startswith(POLICY_CHAIN_PREFIXES):
            step = _step(hit, cluster_policies[hit.chain[8:]], direction)
            if step is not None:
                steps.append(step)
    body = chains.get(name, ())
    args = (direction, ep.key, ep.node)
    if result.verdict == "DROP":
        last = result.hits[-1]
        if last.chain == name:  # the endpoint chain's own DROP: NetworkPolicies selected it, none allowed
            np = sorted({cluster_policies[ln.split()[1][8:]].label for ln in body
                         if ln.startswith(("-j cali-pi-", "-j cali-po-"))})
            return DirectionTrace(*args, False, "NetworkPolicy",
                                  f"selected by {', '.join(np)}; no rule allows it", tuple(steps))
        s = steps[-1]
        return DirectionTrace(*args, False, s.tier, f"{s.where} {direction} rule {s.rule}: Deny",
                              tuple(steps))
    if steps and steps[-1].action in ("Accept", "Allow"):
        s = steps[-1]
        return DirectionTrace(*args, True, s.tier, f"{s.where} {direction} rule {s.rule}: {s.action}",
                              tuple(steps))
    if not body:
        return DirectionTrace(*args, True, "default", f"no policy selects {ep.key} for {direction}: default allow")
    return DirectionTrace(*args, True, "default",
                          "no cluster policy rule decided (Pass or no match) and no NetworkPolicy selects "
                          f"{ep.key} for {direction}: default allow", tuple(steps))


class Tracer:
    """Traces over one model, computing each node's state once (a truth table asks for
    hundreds of connections)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._states: dict = {}
        self._policies: dict[int, dict[str, _Policy]] = {}  # family -> chain id -> policy

    def _state(self, node: str):
        if node not in self._states:
            self._states[node] = dataplane_state(self.cluster, CalcConfig(node_name=node))
        return self._states[node]

    def trace(self, src: Party, dst: Party, port: int, protocol: str, family: int | None = None) -> Trace:
        """The verdict for a new connection src -> dst:port/protocol over IP `family` (None:
        the family of an address given, else IPv4), and why."""
        proto = protocol.lower()
        if proto not in PROTOCOLS:
            raise TraceError(f"protocol {protocol!r} is not one of tcp, udp, sctp")
        if not 1 <= port <= 65535:
            raise TraceError(f"port {port} is not in 1-65535")
        family = _family(src, dst, family)
        src_ip, dst_ip = _address(src, family), _address(dst, family)
        label = lambda p: p.key if isinstance(p, Endpoint) else p  # noqa: E731
        head = (label(src), label(dst), port, proto)
        if isinstance(src, Endpoint) and isinstance(dst, Endpoint) and src.key == dst.key:
            return Trace(*head, True, "a pod reaching itself never leaves it: no policy applies", family=family)
        for p in (src, dst):
            if isinstance(p, Endpoint) and not p.node:
                raise TraceError(f"pod {p.key} is not scheduled to a node")
        nodes = dict.fromkeys(p.node for p in (src, dst) if isinstance(p, Endpoint))
        if family not in self._policies:
            self._policies[family] = _policies(self.cluster, family)
        policies = self._policies[family]

        def packet(node: str) -> Packet:
            return Packet(src_ip, dst_ip, proto, port,
                          in_iface=_iface(src) if isinstance(src, Endpoint) and src.node == node else UPLINK,
                          out_iface=_iface(dst) if isinstance(dst, Endpoint) and dst.node == node else UPLINK)

        allowed = True
        for node in nodes:
            state = self._state(node)
            # The whole of FORWARD as we program it: cali-FORWARD marks what it allows, and
            # our last rule accepts it (calc/filter.py).
            hooks = state.hooks if family == 4 else state.hooks6
            if run_builtin(_filter(state, family), hooks, "filter", "FORWARD", packet(node),
                           state.ipsets).verdict != "ACCEPT":
                allowed = False
        directions = []
        if isinstance(src, Endpoint):
            directions.append(_direction(policies, self._state(src.node), src, "egress", packet(src.node), family))
        if isinstance(dst, Endpoint):
            directions.append(_direction(policies, self._state(dst.node), dst, "ingress", packet(dst.node), family))
        denied = [d for d in directions if not d.allowed]
        if denied:
            reason = "; ".join(f"{d.direction} of {d.pod}: {d.reason}" for d in denied)
        elif not allowed:
            reason = "dropped before any policy: the source is not the pod's wired address or interface"
        else:
            reason = "; ".join(f"{d.direction} of {d.pod}: {d.reason}" for d in directions)
        return Trace(*head, allowed, reason, tuple(directions), family)


def trace(cluster: Cluster, src: Party, dst: Party, port: int, protocol: str, family: int | None = None) -> Trace:
    """The verdict for a new connection src -> dst:port/protocol, and why."""
    return Tracer(cluster).trace(src, dst, port, protocol, family)
