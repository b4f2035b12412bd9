"""The nat table: floating IPs of this node's pods and natOutgoing for pool traffic.

cali-fip-dnat (from cali-PREROUTING and nat cali-OUTPUT) rewrites a floating IP to the
pod's address; cali-fip-snat (from cali-POSTROUTING) rewrites the source of a pod talking
to its own floating IP back to that IP, so the reply hairpins through the same conntrack
entry.  cali-nat-outgoing masquerades traffic from a natOutgoing pool to anything that is
neither in a pool nor a node address.

IPv6 (nat6_state): the same cali-nat-outgoing in ip6tables' nat table for natOutgoing
IPv6 pools.  Its matches are the pool CIDRs and node addresses themselves rather than
ipsets: a cluster has a handful of IPv6 pools, and so the chain needs no IPv6 sets.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

from felix_agent.calc.desired import Chains as TableChains
from felix_agent.calc.desired import Hook, IpSet
from felix_agent.calc.ipsets import net_members
from felix_agent.calc.names import (
    ALL_HOSTS_SET,
    ALL_POOLS_SET,
    FIP_DNAT,
    FIP_SNAT,
    MASQ_POOLS_SET,
    NAT_OUTGOING,
    NAT_OUTPUT,
    NAT_POSTROUTING,
    NAT_PREROUTING,
)
from felix_agent.calc.rule_text import host, rule
from felix_agent.calc.selectors import ipv4_addresses
from felix_agent.model import Endpoint, IPPool, Node

Chains = dict[str, tuple[str, ...]]


def floating_ip_chains(local_endpoints: Sequence[Endpoint], errors: list[str]) -> Chains:
    """DNAT/SNAT pairs for the floating IPs of this node's endpoints (first IPv4 address
    of the pod).  A floating IP claimed twice is kept for the first endpoint by key."""
    dnat: list[str] = []
    snat: list[str] = []
    owner: dict[str, str] = {}
    for ep in sorted(local_endpoints, key=lambda e: e.key):
        pod_ips = ipv4_addresses(ep.ips)
        for fip in ep.floating_ips:
            try:
                addr = ipaddress.ip_address(fip)
            except ValueError:
                errors.append(f"pod {ep.key}: floating IP {fip!r} is not an IP address; skipped")
                continue
            if addr.version != 4:
                continue  # IPv6 floating IPs belong to the ip6tables side
            if not pod_ips:
                errors.append(f"pod {ep.key}: floating IP {fip} but the pod has no IPv4 address; skipped")
                continue
            fip = str(addr)
            if fip in owner:
                errors.append(f"pod {ep.key}: floating IP {fip} is already used by {owner[fip]}; skipped")
                continue
            owner[fip] = ep.key
            dnat.append(rule(f"-j DNAT --to-destination {pod_ips[0]}", dst=host(fip)))
            snat.append(rule(f"-j SNAT --to-source {fip}", src=host(pod_ips[0]), dst=host(pod_ips[0])))
    return {FIP_DNAT: tuple(dnat), FIP_SNAT: tuple(snat)}


def nat_outgoing_rules(pools: Iterable[IPPool]) -> tuple[str, ...]:
    if not any(p.nat_outgoing for p in pools):
        return ()
    return (rule("-j MASQUERADE", matches=(
        f"-m set --match-set {MASQ_POOLS_SET} src",
        f"-m set ! --match-set {ALL_POOLS_SET} dst",
        f"-m set ! --match-set {ALL_HOSTS_SET} dst")),)


def pool_sets(pools: Iterable[IPPool], nodes: Iterable[Node], errors: list[str]) -> dict[str, IpSet]:
    """All pools, natOutgoing pools, node addresses.  Disabled pools still count: pods
    allocated before the pool was disabled keep their behaviour."""
    all_pools: set[str] = set()
    masq: set[str] = set()
    for p in pools:
        try:
            if ipaddress.ip_network(p.cidr, strict=False).version != 4:
                continue  # IPv6 pools belong to the ip6tables side
            nets = net_members([p.cidr])
        except ValueError:
            errors.append(f"pool {p.name}: cidr {p.cidr!r} is not a CIDR; left out of the pool sets")
            continue
        all_pools.update(nets)
        if p.nat_outgoing:
            masq.update(nets)
    hosts = {ip for n in nodes for ip in node_hosts(n)}
    return {
        ALL_POOLS_SET: IpSet(ALL_POOLS_SET, frozenset(all_pools)),
        MASQ_POOLS_SET: IpSet(MASQ_POOLS_SET, frozenset(masq)),
        ALL_HOSTS_SET: IpSet(ALL_HOSTS_SET, frozenset(hosts)),
    }


def node_hosts(n: Node) -> list[str]:
    """A node's members of the all-hosts set: its address and tunnel addresses."""
    return ipv4_addresses([n.address, n.vxlan_tunnel_addr, n.ipip_tunnel_addr])


def nat_chains(local_endpoints: Sequence[Endpoint], pools: Iterable[IPPool], errors: list[str]) -> Chains:
    chains: Chains = {
        NAT_PREROUTING: (f"-j {FIP_DNAT}",),
        NAT_OUTPUT: (f"-j {FIP_DNAT}",),
        NAT_POSTROUTING: (f"-j {FIP_SNAT}", f"-j {NAT_OUTGOING}"),
        NAT_OUTGOING: nat_outgoing_rules(pools),
    }
    chains.update(floating_ip_chains(local_endpoints, errors))
    return chains


NAT6_HOOKS = (Hook("nat", "POSTROUTING", NAT_POSTROUTING),)


def nat6_state(pools: Iterable[IPPool], nodes: Iterable[Node]) -> tuple[TableChains, tuple[Hook, ...]]:
    """ip6tables nat: natOutgoing for IPv6 pools (chains by table, hooks).  Traffic to
    any IPv6 pool (disabled ones too: their pods still run) or to a node's IPv6 address
    is returned un-NATed; what is left and comes from a natOutgoing pool is masqueraded."""
    v6 = sorted((p for p in pools if _version(p.cidr) == 6), key=lambda p: p.name)
    keep = [rule("-j RETURN", dst=str(ipaddress.ip_network(p.cidr, strict=False))) for p in v6]
    keep += [rule("-j RETURN", dst=f"{a}/128") for a in sorted({n.address6 for n in nodes if n.address6})]
    masq = [rule("-j MASQUERADE", src=str(ipaddress.ip_network(p.cidr, strict=False)))
            for p in v6 if p.nat_outgoing]
    return ({"nat": {NAT_POSTROUTING: (f"-j {NAT_OUTGOING}",),
                     NAT_OUTGOING: tuple(keep + masq) if masq else ()}}, NAT6_HOOKS)


def _version(cidr: str) -> int:
    try:
        return ipaddress.ip_network(cidr, strict=False).version
    except ValueError:
        return 0  # pool_sets reports the bad CIDR
