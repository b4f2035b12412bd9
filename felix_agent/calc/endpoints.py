"""Per-endpoint chains: cali-tw-<iface> (ingress of the pod) and cali-fw-<iface> (egress).

With no policy of a direction selecting the pod, its chain for that direction is empty
and returns: Kubernetes allows everything until a policy selects the pod.  Otherwise the
chain clears the accept mark, runs each selecting policy's shared chain, returns as soon as
one accepted, and drops what none accepted (the union of the policies).
"""
from __future__ import annotations

from typing import Sequence

from felix_agent.calc.names import (
    CLEAR_ACCEPT_MARK,
    RETURN_IF_ACCEPTED,
    from_wl_chain,
    policy_chain,
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


def endpoint_chains(endpoint: Endpoint, ingress_policy_ids: Sequence[str],
                    egress_policy_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The endpoint's two chains, jumping to the given policies' chains in that order."""
    return {
        to_wl_chain(endpoint.iface): policy_jumps(ingress_policy_ids, "ingress"),
        from_wl_chain(endpoint.iface): policy_jumps(egress_policy_ids, "egress"),
    }
