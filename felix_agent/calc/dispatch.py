"""The dispatch chains: from a cali interface to that endpoint's own chains.

cali-from-wl-dispatch sends a packet to cali-fw-<iface> only when it comes in on <iface>
FROM one of that endpoint's addresses; anything else arriving on a cali interface (another
address, an interface nobody wired) is dropped: a workload may only send as itself.
cali-to-wl-dispatch sends to cali-tw-<iface> by output interface; unknown cali
interfaces are dropped.  Both use goto (-g), so the endpoint chain's RETURN goes straight
back to the chain that called the dispatch.

With many endpoints the chains are split by the first character after "cali" (hex in
practice), one sub-chain per character, so a packet walks ~1/16 of the list.
"""
from __future__ import annotations

from typing import Callable, Sequence

from felix_agent.calc.names import (
    FROM_WL_DISPATCH,
    TO_WL_DISPATCH,
    WL_IFACE_PREFIX,
    dispatch_subchain,
    from_wl_chain,
    to_wl_chain,
)
from felix_agent.calc.rule_text import host, rule
from felix_agent.calc.selectors import ipv4_addresses
from felix_agent.model import Endpoint

SPLIT_ABOVE = 64  # endpoints; below this one flat chain is as fast and easier to read

Chains = dict[str, tuple[str, ...]]


def _from_rules(ep: Endpoint) -> list[str]:
    return [rule(f"-g {from_wl_chain(ep.iface)}", src=host(ip), in_iface=ep.iface)
            for ip in ipv4_addresses(ep.ips)]


def _to_rules(ep: Endpoint) -> list[str]:
    return [rule(f"-g {to_wl_chain(ep.iface)}", out_iface=ep.iface)]


def _dispatch(base: str, endpoints: Sequence[Endpoint], per_endpoint: Callable[[Endpoint], list[str]],
              iface_flag: str) -> Chains:
    eps = sorted(endpoints, key=lambda e: e.iface)
    if len(eps) <= SPLIT_ABOVE:
        return {base: tuple(r for ep in eps for r in per_endpoint(ep)) + ("-j DROP",)}
    groups: dict[str, list[Endpoint]] = {}
    for ep in eps:
        groups.setdefault(ep.iface[len(WL_IFACE_PREFIX)], []).append(ep)
    chains: Chains = {}
    top = []
    for key in sorted(groups):
        sub = dispatch_subchain(base, key)
        top.append(f"{iface_flag} {WL_IFACE_PREFIX}{key}+ -g {sub}")
        chains[sub] = tuple(r for ep in groups[key] for r in per_endpoint(ep)) + ("-j DROP",)
    chains[base] = tuple(top) + ("-j DROP",)
    return chains


def dispatch_chains(local_endpoints: Sequence[Endpoint]) -> Chains:
    """Both dispatch chains (and their sub-chains) for this node's wired endpoints, whose
    interface names must already be checked (cali + at least one character)."""
    chains = _dispatch(FROM_WL_DISPATCH, local_endpoints, _from_rules, "-i")
    chains.update(_dispatch(TO_WL_DISPATCH, local_endpoints, _to_rules, "-o"))
    return chains
