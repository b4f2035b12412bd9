"""The dispatch chains: from a cali interface to that endpoint's own chains.

cali-from-wl-dispatch first drops a packet whose (source address, input interface) pair
is not in the ipset cali40wl-src (ip6tables: cali60wl-src, the IPv6 addresses): a workload
may only send as itself, and an interface nobody wired has no pair at all.  Then it sends
the packet to cali-fw-<iface> by input interface.  cali-to-wl-dispatch sends to
cali-tw-<iface> by output interface.  Unknown cali interfaces are dropped by both.  Both
use goto (-g), so the endpoint chain's RETURN goes straight back to the chain that called
the dispatch.

Why the addresses live in an ipset and not in the dispatch rules: then no rule of the
filter table depends on a pod's address, so the chains of a pod scheduled to this node
are programmed before its CNI ADD (calc/filter.py), and the ADD itself only adds the
pod's address to ipsets (one `ipset restore`, no iptables-restore on the ADD's path).

With many endpoints the chains are split by the first character after "cali" (hex in
practice), one sub-chain per character, so a packet walks ~1/16 of the list.
"""
from __future__ import annotations

from typing import Callable, Sequence

from felix_agent.calc.desired import IpSet
from felix_agent.calc.names import (
    FROM_WL_DISPATCH,
    TO_WL_DISPATCH,
    WL_IFACE_PREFIX,
    WL_SOURCES_SET,
    dispatch_subchain,
    family_set_name,
    from_wl_chain,
    ipset_family,
    to_wl_chain,
)
from felix_agent.calc.rule_text import rule
from felix_agent.calc.selectors import addresses
from felix_agent.model import Endpoint

SPLIT_ABOVE = 64  # endpoints; below this one flat chain is as fast and easier to read

Chains = dict[str, tuple[str, ...]]


def anti_spoof(family: int) -> str:
    # src,src: the address from the packet's source, the interface from its input interface.
    return f"-m set ! --match-set {family_set_name(WL_SOURCES_SET, family)} src,src -j DROP"


def sources_set(wired: Sequence[Endpoint], family: int = 4) -> IpSet:
    """hash:net,iface of "<address>,<iface>" for every address of IP `family` of every
    wired local endpoint: what cali-from-wl-dispatch lets through."""
    return IpSet(family_set_name(WL_SOURCES_SET, family),
                 frozenset(f"{ip},{ep.iface}" for ep in wired for ip in addresses(ep.ips, family)),
                 type="hash:net,iface", family=ipset_family(family))


def _from_rules(ep: Endpoint) -> list[str]:
    return [rule(f"-g {from_wl_chain(ep.iface)}", in_iface=ep.iface)]


def _to_rules(ep: Endpoint) -> list[str]:
    return [rule(f"-g {to_wl_chain(ep.iface)}", out_iface=ep.iface)]


def _dispatch(base: str, endpoints: Sequence[Endpoint], per_endpoint: Callable[[Endpoint], list[str]],
              iface_flag: str, first: tuple[str, ...] = ()) -> Chains:
    eps = sorted(endpoints, key=lambda e: e.iface)
    if len(eps) <= SPLIT_ABOVE:
        return {base: first + tuple(r for ep in eps for r in per_endpoint(ep)) + ("-j DROP",)}
    groups: dict[str, list[Endpoint]] = {}
    for ep in eps:
        groups.setdefault(ep.iface[len(WL_IFACE_PREFIX)], []).append(ep)
    chains: Chains = {}
    top = []
    for key in sorted(groups):
        sub = dispatch_subchain(base, key)
        top.append(f"{iface_flag} {WL_IFACE_PREFIX}{key}+ -g {sub}")
        chains[sub] = tuple(r for ep in groups[key] for r in per_endpoint(ep)) + ("-j DROP",)
    chains[base] = first + tuple(top) + ("-j DROP",)
    return chains


def dispatch_chains(local_endpoints: Sequence[Endpoint], families: Sequence[int] = (4,)) -> dict[int, Chains]:
    """Both dispatch chains (and their sub-chains) for this node's endpoints, wired or about
    to be, whose interface names must already be checked (cali + at least one character),
    for each IP family in `families`.  Only the interfaces matter here; addresses are in
    sources_set().  The families differ only in the anti-spoofing rule's set, so the chains
    are built once and shared."""
    chains = _dispatch(FROM_WL_DISPATCH, local_endpoints, _from_rules, "-i", (anti_spoof(families[0]),))
    chains.update(_dispatch(TO_WL_DISPATCH, local_endpoints, _to_rules, "-o"))
    out = {families[0]: chains}
    for family in families[1:]:
        out[family] = {**chains, FROM_WL_DISPATCH: (anti_spoof(family), *chains[FROM_WL_DISPATCH][1:])}
    return out
