"""Per-endpoint chains: cali-tw-<iface> (ingress of the pod) and cali-fw-<iface> (egress).

With no policy of a direction selecting the pod, its chain for that direction is empty
and returns: Kubernetes allows everything until a policy selects the pod.  Otherwise, in
the order of the network-policy-api's tiers:

1. Admin tier: each cluster policy's chain by precedence, each only while no Pass was
   seen; an Accept returns (allowed, NetworkPolicy skipped), a Deny has dropped, a Pass
   or no match goes on.
2. NetworkPolicy: when some NetworkPolicy selects the pod in this direction, its chains
   (returns as soon as one accepted) and a DROP for what none accepted: final.
3. Baseline tier (only when no NetworkPolicy selects the pod in this direction): the pass
   bit is cleared, then as in 1.; nothing matched or a Pass falls off the end: allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from felix_agent.calc.names import (
    CLEAR_ACCEPT_MARK,
    CLEAR_PASS_MARK,
    CLEAR_TIER_MARKS,
    IF_NOT_PASSED,
    RETURN_IF_ACCEPTED,
    from_wl_chain,
    policy_chain,
    tier_chain,
    to_wl_chain,
)
from felix_agent.model import Endpoint


def policy_jumps(policy_ids: Sequence[str], direction: str) -> tuple[str, ...]:
    if not policy_ids:
        return ()
    body = [CLEAR_ACCEPT_MARK]
    for pid in policy_ids:
        body += [f"-j {policy_chain(pid, direction)}", RETURN_IF_ACCEPTED]
    body.append("-j DROP")
    return tuple(body)


def tier_jumps(policy_ids: Sequence[str], direction: str) -> list[str]:
    """One tier: each policy's chain while no Pass was seen, returning on an Accept."""
    body: list[str] = []
    for i, pid in enumerate(policy_ids):
        # The first needs no guard: the bit was cleared just before.
        body += [f"{IF_NOT_PASSED + ' ' if i else ''}-j {tier_chain(pid, direction)}", RETURN_IF_ACCEPTED]
    return body


@dataclass(frozen=True)
class EndpointPolicies:
    """Which policies' chains one direction of an endpoint runs, each list in order."""

    admin: tuple[str, ...] = ()  # cluster policy ids, by precedence
    network: tuple[str, ...] = ()  # NetworkPolicy ids, by key
    baseline: tuple[str, ...] = ()  # cluster policy ids, by precedence


def direction_chain(p: EndpointPolicies, direction: str) -> tuple[str, ...]:
    if not p.admin and not p.baseline:
        return policy_jumps(p.network, direction)  # the NetworkPolicy-only layout, unchanged
    body = [CLEAR_TIER_MARKS, *tier_jumps(p.admin, direction)]
    if p.network:
        body += policy_jumps(p.network, direction)[1:]  # the marks are already clear
    elif p.baseline:
        if p.admin:
            body.append(CLEAR_PASS_MARK)  # an Admin Pass must not skip the Baseline tier
        body += tier_jumps(p.baseline, direction)
    return tuple(body)


def endpoint_chains(endpoint: Endpoint, ingress: EndpointPolicies,
                    egress: EndpointPolicies) -> dict[str, tuple[str, ...]]:
    """The endpoint's two chains."""
    return {
        to_wl_chain(endpoint.iface): direction_chain(ingress, "ingress"),
        from_wl_chain(endpoint.iface): direction_chain(egress, "egress"),
    }
