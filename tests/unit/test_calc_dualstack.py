"""The policy calc's two families from one model: ip6tables gets the same chains as
iptables, its sets are the cali60 twins with the IPv6 members, an ipBlock acts only in its
own family, anti-spoofing and the ICMPv6 a pod needs, the tiers, and trace over IPv6.
(Verdicts against an independent reading of the API: test_calc_semantics.py; incremental
== full over dual-stack events: test_calc_incremental.py.)"""
import pytest

from felix_agent.calc.names import family_set_name
from felix_agent.calc.simulate import Packet, run, run_builtin
from felix_agent.calc.trace import TraceError, trace
from felix_agent.model import (
    ClusterNetworkPolicy, NamedPort, NamespacedPods, NetworkPolicy, Node, PolicyPort, TierPeer, TierPort, TierRule,
)
from tests.unit.test_calc_fixtures import (
    cluster_of, egress, from_block, from_pods, iface_of, ingress, pod, rule_, sel, state,
)

WEB4, WEB6 = "10.0.0.5", "fd00::5"
CLI4, CLI6 = "10.0.0.6", "fd00::6"
WEB, CLI = iface_of("x", "web"), iface_of("x", "cli")


def world(*records):
    return cluster_of(pod("x", "web", WEB4, labels={"app": "web"}, ports=(NamedPort("http", 8080),), ip6=WEB6),
                      pod("x", "cli", CLI4, labels={"app": "cli"}, ip6=CLI6),
                      pod("x", "far", "10.0.1.7", node="n2", labels={"app": "far"}, ip6="fd00:1::7"), *records)


def forward(st, src: str, dst: str, dport: int = 80, in_iface: str = CLI, out_iface: str = WEB, proto: str = "tcp"):
    """What built-in FORWARD does with the packet as we program it, in the filter table of
    its family: "DROP", "ACCEPT" (workload traffic our chains allowed), or "not ours"."""
    chains, hooks = (st.chains6, st.hooks6) if ":" in src else (st.chains, st.hooks)
    verdict = run_builtin(chains["filter"], hooks, "filter", "FORWARD",
                          Packet(src, dst, proto, dport, in_iface=in_iface, out_iface=out_iface), st.ipsets).verdict
    return "DROP" if verdict == "DROP" else "ACCEPT" if verdict == "ACCEPT" else "not ours"


def test_same_chain_names_and_endpoint_chains_in_both_families_sets_are_twins():
    st = state(world(ingress("x", "p", sel(app="web"), rule_(from_pods(sel(app="cli")),
                                                             ports=(PolicyPort("TCP", "http"),)))))
    f4, f6 = st.chains["filter"], st.chains6["filter"]
    assert set(f4) == set(f6)
    for name in f4:
        if name.startswith(("cali-tw-", "cali-fw-", "cali-to-wl-dispatch")):
            assert f4[name] == f6[name], name  # no address, no set: the same text
    v4 = {n: s for n, s in st.ipsets.items() if n.startswith("cali40") and "ipam" not in n and "hosts" not in n}
    for name, s4 in v4.items():
        s6 = st.ipsets[family_set_name(name, 6)]
        assert (s4.family, s6.family, s4.type) == ("inet", "inet6", s6.type)
        assert all(":" not in m.split(",")[0] for m in s4.members)
        assert all(":" in m.split(",")[0] for m in s6.members)
    assert st.ipsets[family_set_name(next(n for n in v4 if n.startswith("cali40n:")), 6)].members == {
        f"{WEB6},tcp:8080"}
    assert st.ipsets["cali60wl-src"].members == {f"{WEB6},{WEB}", f"{CLI6},{CLI}"}
    assert {(h.table, h.builtin) for h in st.hooks6} >= {("filter", "INPUT"), ("filter", "FORWARD"),
                                                          ("filter", "OUTPUT"), ("raw", "PREROUTING")}
    assert forward(st, CLI6, WEB6, 8080) == forward(st, CLI4, WEB4, 8080) == "ACCEPT"
    assert forward(st, CLI6, WEB6, 80) == forward(st, CLI4, WEB4, 80) == "DROP"


def test_an_ipblock_acts_only_in_its_own_family():
    """NetworkPolicy: an ipBlock matches addresses of its family only.  A rule whose only
    peer is an IPv4 block allows no IPv6 traffic; the other rules still govern IPv6."""
    only_v4 = ingress("x", "v4", sel(app="web"), rule_(from_block("10.0.0.0/24")))
    st = state(world(only_v4))
    assert forward(st, CLI4, WEB4) == "ACCEPT"
    assert forward(st, CLI6, WEB6) == "DROP"  # selected, and no rule of the policy is IPv6
    assert not any("10.0.0.0/24" in r for rules in st.chains6["filter"].values() for r in rules)

    also_pods = ingress("x", "v4", sel(app="web"), rule_(from_block("10.0.0.0/24")),
                        rule_(from_pods(sel(app="cli")), ports=(PolicyPort("TCP", 443),)))
    st = state(world(also_pods))
    assert forward(st, CLI6, WEB6, 443) == "ACCEPT" and forward(st, CLI6, WEB6, 80) == "DROP"
    assert forward(st, CLI4, WEB4, 80) == "ACCEPT"

    only_v6 = ingress("x", "v6", sel(app="web"), rule_(from_block("fd00::/120", "fd00::6/128")))
    st = state(world(only_v6))
    assert forward(st, CLI6, WEB6) == "DROP"  # the except
    assert forward(st, "fd00::8", WEB6, in_iface="eth0") == "ACCEPT"
    assert forward(st, CLI4, WEB4) == "DROP"  # an IPv6 block allows nothing over IPv4
    mixed = egress("x", "out", sel(app="cli"), rule_(from_block("192.0.2.0/24"), from_block("2001:db8::/32")))
    st = state(world(mixed))
    assert forward(st, CLI4, "192.0.2.1", out_iface="eth0") == "ACCEPT"
    assert forward(st, CLI6, "2001:db8::1", out_iface="eth0") == "ACCEPT"
    assert forward(st, CLI6, "2001:db9::1", out_iface="eth0") == "DROP"


def test_ipv6_anti_spoofing_and_ipv6_only_pods():
    st = state(world(), wl_to_host_action="ACCEPT")
    assert forward(st, CLI6, WEB6) == "ACCEPT"
    assert forward(st, WEB6, WEB6) == "DROP"  # cli's veth, web's address
    assert forward(st, "fe80::1", WEB6) == "DROP"  # a link-local source is nobody's address
    assert forward(st, "fd00::99", WEB6, in_iface="cali0000000dead") == "DROP"
    to_host = lambda src, iface: run(st.chains6["filter"], "cali-INPUT",  # noqa: E731
                                     Packet(src, "fd00:100::11", "tcp", 22, in_iface=iface), st.ipsets).verdict
    assert to_host(CLI6, CLI) == "ACCEPT" and to_host(WEB6, CLI) == "DROP"
    # an IPv6-only pod: its IPv6 passes, and it has nothing to say over IPv4
    st = state(cluster_of(pod("x", "v6", "fd00::9")))
    v6 = iface_of("x", "v6")
    assert st.ipsets["cali60wl-src"].members == {f"fd00::9,{v6}"} and not st.ipsets["cali40wl-src"].members
    assert forward(st, "fd00::9", "fd00:1::1", in_iface=v6, out_iface="eth0") == "ACCEPT"
    assert forward(st, "10.0.0.9", "10.0.1.1", in_iface=v6, out_iface="eth0") == "DROP"


@pytest.mark.parametrize("action", ["ACCEPT", "DROP"])
def test_icmpv6_neighbour_discovery_under_default_deny(action):
    """A pod behind deny-all (both directions) still resolves its gateway and answers the
    node (NS/NA 135/136 from its link-local or unspecified source), solicits routers (133)
    and sends MLD (130-132), as Felix allows; it never sends router advertisements (134) or
    redirects (137), and its other traffic to the node stays under policy."""
    deny = NetworkPolicy("x", "deny", sel(), policy_types=("Ingress", "Egress"))
    st = state(world(deny), wl_to_host_action=action)
    f6 = st.chains6["filter"]

    def icmp(src: str, icmp_type: int):
        return run(f6, "cali-INPUT", Packet(src, "ff02::1:ff00:1", "ipv6-icmp", icmp_type, in_iface=WEB),
                   st.ipsets).verdict
    for t in (130, 131, 132, 133, 135, 136):
        assert icmp("fe80::5", t) == "ACCEPT" and icmp("::", t) == "ACCEPT", t
    for t in (134, 137, 128):
        assert icmp("fe80::5", t) == "DROP", t  # not ours to let through: anti-spoofing drops it
    assert icmp(WEB6, 128) == "DROP"  # echo to the node: egress policy, deny-all
    assert not any("icmp6" in r for rules in st.chains["filter"].values() for r in rules)


def test_tiers_in_both_families():
    """A cluster policy's networks act in their own family; selector peers, Pass and the
    marks work the same over IPv6."""
    cnp = ClusterNetworkPolicy("c", "Admin", 1, TierPeer(namespaces=sel()), egress=(
        TierRule("Deny", (TierPeer(networks=("2001:db8::/32",)),)),
        TierRule("Pass", (TierPeer(networks=("192.0.2.0/24", "2001:db9::/32")),)),
        TierRule("Deny", (TierPeer(pods=NamespacedPods(sel(), sel(app="web"))),), (TierPort("TCP", 80),)),
    ))
    banp = ClusterNetworkPolicy("b", "Baseline", 1000, TierPeer(namespaces=sel()), egress=(
        TierRule("Deny", (TierPeer(networks=("0.0.0.0/0", "::/0")),)),))
    st = state(world(cnp, banp))
    out = dict(out_iface="eth0")
    assert forward(st, CLI6, "2001:db8::1", **out) == "DROP"  # Admin deny, IPv6 only
    assert forward(st, CLI4, "192.0.2.1", **out) == "DROP"  # Pass -> Baseline deny
    assert forward(st, CLI6, "2001:db9::1", **out) == "DROP"  # Pass -> Baseline deny
    assert forward(st, CLI6, WEB6, 80) == forward(st, CLI4, WEB4, 80) == "DROP"  # selector peer, both
    assert forward(st, CLI6, WEB6, 81) == "DROP"  # Baseline ::/0
    st = state(world(cnp))
    assert forward(st, CLI6, "2001:db9::1", **out) == forward(st, CLI6, WEB6, 81) == "ACCEPT"
    assert forward(st, CLI4, "198.51.100.1", **out) == "ACCEPT"


def test_node_peer_sets_hold_the_family_of_the_node_address():
    cnp = ClusterNetworkPolicy("c", "Admin", 1, TierPeer(namespaces=sel()), egress=(
        TierRule("Accept", (TierPeer(nodes=sel()),)),))
    st = state(world(cnp, Node("n1", "192.168.100.11/24", "fd00:100::11/64"), Node("n2", "192.168.100.12/24")))
    (h4,) = [s for n, s in st.ipsets.items() if n.startswith("cali40h:")]
    (h6,) = [s for n, s in st.ipsets.items() if n.startswith("cali60h:")]
    assert h4.members == {"192.168.100.11", "192.168.100.12"} and h6.members == {"fd00:100::11"}


def test_trace_over_ipv6():
    c = world(ingress("x", "v4", sel(app="web"), rule_(from_block("10.0.0.0/24"))))
    eps = {e.key: e for e in c.endpoints()}
    cli, web = eps["x/cli"], eps["x/web"]
    assert trace(c, cli, web, 80, "tcp").allowed  # IPv4 by default
    t6 = trace(c, cli, web, 80, "tcp", family=6)
    assert not t6.allowed and t6.family == 6
    assert t6.directions[1].decided_by == "NetworkPolicy" and "no rule allows it" in t6.directions[1].reason
    assert trace(c, cli, "2001:db8::1", 443, "tcp").family == 6  # an address gives the family
    with pytest.raises(TraceError, match="IPv6"):
        trace(c, cli, "10.9.9.9", 443, "tcp", family=6)
    v4only = cluster_of(pod("x", "old", "10.0.0.8"), pod("x", "web", WEB4, ip6=WEB6))
    old = {e.key: e for e in v4only.endpoints()}["x/old"]
    with pytest.raises(TraceError, match="no IPv6 address"):
        trace(v4only, old, WEB6, 80, "tcp")
