"""One cluster policy (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy)
-> its shared chains cali-ci-<id> (ingress rules) / cali-co-<id> (egress rules).

Like a NetworkPolicy's chains (calc/policy.py, whose rule builder this reuses), a chain
depends on the policy alone: peers and named ports are ipsets named by meaning, so label
changes move set members and never touch the chain.  Every subject of the policy jumps to
the same chain.

Rules keep their order, and each rule's lines act at once, so the first matching rule
decides:  Accept sets the accept mark and returns, Pass sets the pass mark and returns,
Deny drops.  No match returns with neither mark: the next policy of the tier is asked.
"""
from __future__ import annotations

from functools import lru_cache
from types import MappingProxyType

from felix_agent.calc.names import (
    RETURN_IF_ACCEPTED,
    RETURN_IF_PASSED,
    SET_ACCEPT_MARK,
    SET_PASS_MARK,
    tier_chain,
)
from felix_agent.calc.ipsets import NodeSet
from felix_agent.calc.policy import MatchPeer, PolicyChains, RuleBuilder, rule_lines
from felix_agent.calc.selectors import MATCH_ALL, PeerSelector
from felix_agent.model import ClusterPolicy, IPBlock, PolicyPeer, PolicyPort, PolicyRule, TierPeer, TierRule

_TARGET = {
    "Accept": (SET_ACCEPT_MARK, RETURN_IF_ACCEPTED),
    "Pass": (SET_PASS_MARK, RETURN_IF_PASSED),
    "Deny": ("-j DROP", ""),
}


def peer_selector(peer: TierPeer) -> PeerSelector | None:
    """The pods a subject or selector peer means (None for a networks peer).  Both forms
    name their namespaces: `namespaces` is every pod there, `pods` some pods there."""
    if peer.namespaces is not None:
        return PeerSelector(pods=MATCH_ALL, namespaces=peer.namespaces)
    if peer.pods is not None:
        return PeerSelector(pods=peer.pods.pods, namespaces=peer.pods.namespaces)
    return None


def subject_selector(policy: ClusterPolicy) -> PeerSelector:
    sel = peer_selector(policy.subject)
    # the converter refuses a networks subject; a hand-built one selects nobody.
    return sel if sel is not None else PeerSelector(pods=MATCH_ALL, namespace="")


def _node_peers(r: TierRule, family: int) -> tuple[MatchPeer, ...]:
    """`nodes` peers (egress only): their addresses of IP `family` as an ipset of Node records."""
    out = []
    for p in r.peers:
        if p.nodes is not None:
            spec = NodeSet(p.nodes, family)
            out.append(MatchPeer(matches=(f"-m set --match-set {spec.name} dst",), sets=(spec,)))
    return tuple(out)


def _as_policy_rule(r: TierRule) -> PolicyRule:
    """The rule's peers and ports in NetworkPolicy terms, so calc/policy.py's line
    builder (sets, named ports, multiport) serves both kinds of policy."""
    peers: list[PolicyPeer] = []
    for p in r.peers:
        sel = peer_selector(p)
        if sel is not None:
            peers.append(PolicyPeer(pod_selector=sel.pods, namespace_selector=sel.namespaces))
        peers += [PolicyPeer(ip_block=IPBlock(cidr)) for cidr in p.networks]
    ports = tuple(PolicyPort(protocol=p.protocol or "", port=p.name or p.port, end_port=p.end_port)  # type: ignore[arg-type]
                  for p in r.ports)
    return PolicyRule(peers=tuple(peers), ports=ports)


@lru_cache(maxsize=4096)
def tier_policy_chains(policy: ClusterPolicy, family: int = 4) -> PolicyChains:
    """The policy's chains (one per direction that has rules) for IP `family` and the sets
    they name.  Pure and cached by value."""
    b = RuleBuilder(f"{policy.kind} {policy.name}", subject_selector(policy), family=family)
    chains: dict[str, tuple[str, ...]] = {}
    rule_of: dict[str, tuple[int, ...]] = {}
    for direction in ("ingress", "egress"):
        rules: tuple[TierRule, ...] = getattr(policy, direction)
        if not rules:
            continue  # "CNPs with no ingress rules do not affect ingress traffic"
        body: list[str] = []
        index: list[int] = []
        for i, r in enumerate(rules):
            target, after = _TARGET[r.action]
            for line in rule_lines(b, _as_policy_rule(r), i, direction, _node_peers(r, family)):
                body.append(line + (" " if line else "") + target)
                index.append(i)
                if after:
                    body.append(after)
                    index.append(i)
        chains[tier_chain(policy.id, direction)] = tuple(body)
        rule_of[tier_chain(policy.id, direction)] = tuple(index)
    return PolicyChains(MappingProxyType(chains), tuple(b.sets), tuple(b.errors), MappingProxyType(rule_of))
