"""Tiered cluster policy, behaviour not text: the generated chains run on packets through
test_calc_semantics' tiny iptables, against an independent reading of the
network-policy-api rules (Admin tier by priority, rules in order, first match wins;
then NetworkPolicy; then the Baseline tier only where no NetworkPolicy selects the pod).
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix_agent.calc.trace import trace
from felix_agent.model import (
    BANP_PRIORITY,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    LabelSelector,
    NamedPort,
    Namespace,
    NamespacedPods,
    NetworkPolicy,
    PolicyPeer,
    PolicyRule,
    TierPeer,
    TierPort,
    TierRule,
)
from tests.unit.test_calc_fixtures import cluster_of, iface_of, pod, sel, state, upd
from tests.unit.test_calc_semantics import (
    LBL,
    NAMED,
    POLICY,
    SEL,
    Packet,
    allowed,
    forward,
    forward_verdicts,
    make_world,
)

# --- reference semantics (from the API's documentation, not from the calc) -----------------


def tier_peer_match(peer: TierPeer, other: dict) -> bool:
    if peer.networks:
        ip = ipaddress.ip_address(other["ip"])
        return any(ip in ipaddress.ip_network(n, strict=False) for n in peer.networks)
    if peer.namespaces is not None:
        return peer.namespaces.matches(other["ns_labels"])
    assert peer.pods is not None
    return peer.pods.namespaces.matches(other["ns_labels"]) and peer.pods.pods.matches(other["labels"])


def tier_port_match(p: TierPort, proto: str, dport: int, dst: dict) -> bool:
    if p.name:  # resolves on the destination pod, whatever the protocol of its port
        return any(np.name == p.name and np.protocol.lower() == proto and np.port == dport for np in dst["ports"])
    return (p.protocol or "").lower() == proto and (p.port is None or p.port <= dport <= (p.end_port or p.port))


def tier_decision(cps, tier: str, direction: str, me: dict, other: dict, proto: str, dport: int,
                  dst: dict) -> str:
    """"Accept", "Deny" or "Pass" (no rule matched counts as Pass: on to the next tier)."""
    mine = [cp for cp in cps if cp.tier == tier and tier_peer_match(cp.subject, me)]
    for cp in sorted(mine, key=lambda cp: cp.precedence):
        for r in getattr(cp, direction):
            if any(tier_peer_match(x, other) for x in r.peers) and \
               (not r.ports or any(tier_port_match(x, proto, dport, dst) for x in r.ports)):
                if r.action == "Pass":
                    return "Pass"
                return r.action
    return "Pass"


def tiered_allowed(cps, policies, direction: str, me: dict, other: dict, proto: str, dport: int,
                   dst: dict) -> bool:
    admin = tier_decision(cps, "Admin", direction, me, other, proto, dport, dst)
    if admin != "Pass":
        return admin == "Accept"
    ptype = "Ingress" if direction == "ingress" else "Egress"
    if any(ptype in p.policy_types and p.namespace == me["ns"] and p.pod_selector.matches(me["labels"])
           for p in policies):
        return allowed(policies, direction, me, other, proto, dport, dst)
    return tier_decision(cps, "Baseline", direction, me, other, proto, dport, dst) != "Deny"


# --- generated clusters ---------------------------------------------------------------------

NS_SEL = st.sampled_from([LabelSelector(), sel(team="a"), sel(**{"kubernetes.io/metadata.name": "y"})])
TPEER = st.one_of(
    st.builds(lambda s: TierPeer(namespaces=s), NS_SEL),
    st.builds(lambda n, p: TierPeer(pods=NamespacedPods(n, p)), NS_SEL, SEL),
)
EGRESS_PEER = st.one_of(TPEER, st.sampled_from([TierPeer(networks=("10.0.0.0/30",)),
                                                TierPeer(networks=("10.0.1.0/24", "0.0.0.0/0"))]))
TPORT = st.one_of(
    st.builds(TierPort, st.sampled_from(["TCP", "UDP"]), st.sampled_from([53, 80, 81])),
    st.builds(lambda proto: TierPort(proto, 80, 81), st.sampled_from(["TCP", "UDP"])),
    st.builds(lambda n: TierPort(None, name=n), st.sampled_from(["http", "dns"])),
)
ACTION = st.sampled_from(["Accept", "Deny", "Pass"])


def _rules(peer):
    return st.lists(st.builds(lambda a, peers, ports: TierRule(a, tuple(peers), tuple(ports)),
                              ACTION, st.lists(peer, min_size=1, max_size=2), st.lists(TPORT, max_size=2)),
                    max_size=2)


CNP = st.builds(lambda i, tier, prio, subj, ing, eg: ClusterNetworkPolicy(f"c{i}", tier, prio, subj, tuple(ing),
                                                                          tuple(eg)),
                st.integers(0, 1000), st.sampled_from(["Admin", "Baseline"]), st.integers(0, 3), TPEER,
                _rules(TPEER), _rules(EGRESS_PEER))
ANP = st.builds(lambda prio, subj, ing: AdminNetworkPolicy("a", "Admin", prio, subj, tuple(ing)),
                st.integers(0, 3), TPEER, _rules(TPEER))
POD = st.tuples(st.sampled_from(["x", "y"]), LBL, st.sampled_from(["n1", "n2"]), NAMED)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pods=st.lists(POD, min_size=2, max_size=4), cnps=st.lists(CNP, max_size=3, unique_by=lambda p: p.name),
       anps=st.lists(ANP, max_size=1), policies=st.lists(POLICY, max_size=2, unique_by=lambda p: p.key),
       ns_x=LBL, ns_y=LBL)
def test_forward_verdicts_match_the_tiered_reference(pods, cnps, anps, policies, ns_x, ns_y):
    cps = [*cnps, *anps]
    info, c = make_world(pods, {"x": ns_x, "y": ns_y}, *policies, *cps)
    for a, b, proto, dport, got in forward_verdicts(c, info, (("tcp", 80), ("tcp", 81), ("udp", 53), ("udp", 80))):
        want = ((a["node"] != "n1" or tiered_allowed(cps, policies, "egress", a, b, proto, dport, b)) and
                (b["node"] != "n1" or tiered_allowed(cps, policies, "ingress", b, a, proto, dport, b)))
        assert got == ("ACCEPT" if want else "DROP"), (a, b, proto, dport)
    # tortiectl trace's verdict, on every pair whatever their nodes (each node's own chains)
    eps = {e.key: e for e in c.endpoints()}
    for i, a in enumerate(info):
        for j, b in enumerate(info):
            if i != j:
                want = (tiered_allowed(cps, policies, "egress", a, b, "tcp", 80, b) and
                        tiered_allowed(cps, policies, "ingress", b, a, "tcp", 80, b))
                t = trace(c, eps[a["key"]], eps[b["key"]], 80, "tcp")
                assert t.allowed == want, (a, b, t)
                assert t.allowed == all(d.allowed for d in t.directions), t


# --- the cases the API documents, one by one ----------------------------------------------

X = TierPeer(namespaces=sel(**{"kubernetes.io/metadata.name": "x"}))
Y = TierPeer(namespaces=sel(**{"kubernetes.io/metadata.name": "y"}))


def verdict(*records, src="10.0.0.2", dst="10.0.0.3", proto="tcp", dport=80) -> str:
    """client y/c (10.0.0.2) -> server x/s (10.0.0.3, port "http" = 80), both on this node."""
    c = cluster_of(Namespace("x"), Namespace("y"),
                   pod("y", "c", "10.0.0.2", labels={"app": "c"}),
                   pod("x", "s", "10.0.0.3", labels={"app": "s"}, ports=(NamedPort("http", 80),)),
                   *records)
    s = state(c)
    pkt = Packet(src, dst, proto, dport, in_iface=iface_of("y", "c"), out_iface=iface_of("x", "s"))
    return forward(s, pkt) or "NONE"


NP_DENY_ALL = NetworkPolicy("x", "deny", LabelSelector())
NP_ALLOW_Y = NetworkPolicy("x", "allow", LabelSelector(), ingress=(PolicyRule(peers=(
    PolicyPeer(namespace_selector=sel(**{"kubernetes.io/metadata.name": "y"})),)),))


def cnp(name, tier, prio, *ingress: TierRule, subject=X, egress=()) -> ClusterNetworkPolicy:
    return ClusterNetworkPolicy(name, tier, prio, subject, tuple(ingress), tuple(egress))


def test_admin_deny_overrides_a_networkpolicy_allow():
    assert verdict(NP_ALLOW_Y) == "ACCEPT"
    assert verdict(NP_ALLOW_Y, cnp("d", "Admin", 5, TierRule("Deny", (Y,)))) == "DROP"


def test_admin_accept_overrides_a_networkpolicy_deny_and_pass_hands_over():
    assert verdict(NP_DENY_ALL) == "DROP"
    assert verdict(NP_DENY_ALL, cnp("a", "Admin", 5, TierRule("Accept", (Y,)))) == "ACCEPT"
    assert verdict(NP_DENY_ALL, cnp("p", "Admin", 5, TierRule("Pass", (Y,)))) == "DROP"
    assert verdict(NP_ALLOW_Y, cnp("p", "Admin", 5, TierRule("Pass", (Y,)))) == "ACCEPT"
    # a Pass skips the rest of the Admin tier: a later Deny does not apply
    assert verdict(cnp("p", "Admin", 1, TierRule("Pass", (Y,))), cnp("d", "Admin", 2, TierRule("Deny", (Y,)))) == "ACCEPT"


def test_priority_between_policies_and_rule_order_within_one():
    deny, accept = TierRule("Deny", (Y,)), TierRule("Accept", (Y,))
    assert verdict(NP_DENY_ALL, cnp("a", "Admin", 1, accept), cnp("b", "Admin", 2, deny)) == "ACCEPT"
    assert verdict(NP_DENY_ALL, cnp("a", "Admin", 3, accept), cnp("b", "Admin", 2, deny)) == "DROP"
    assert verdict(cnp("a", "Admin", 1, deny, accept)) == "DROP"
    assert verdict(NP_DENY_ALL, cnp("a", "Admin", 1, accept, deny)) == "ACCEPT"


def test_baseline_applies_only_where_no_networkpolicy_selects():
    base_deny = cnp("b", "Baseline", 1, TierRule("Deny", (Y,)))
    assert verdict(base_deny) == "DROP"
    assert verdict(base_deny, NP_ALLOW_Y) == "ACCEPT"
    # an egress-only NetworkPolicy does not select the pod for ingress: Baseline still applies
    assert verdict(base_deny, NetworkPolicy("x", "eg", LabelSelector(), policy_types=("Egress",))) == "DROP"
    # an Admin Pass goes to the Baseline tier when no NetworkPolicy selects the pod
    assert verdict(base_deny, cnp("p", "Admin", 1, TierRule("Pass", (Y,)))) == "DROP"
    # ... and the Admin Pass does not skip Baseline policies after the first one
    base_other = cnp("a", "Baseline", 0, TierRule("Accept", (X,)))
    assert verdict(base_other, base_deny, cnp("p", "Admin", 1, TierRule("Pass", (Y,)))) == "DROP"
    # a BANP comes after every Baseline CNP
    banp = BaselineAdminNetworkPolicy("default", "Baseline", BANP_PRIORITY, X, (TierRule("Deny", (Y,)),))
    assert verdict(banp, cnp("b", "Baseline", 1000, TierRule("Accept", (Y,)))) == "ACCEPT"
    assert verdict(banp, cnp("b", "Baseline", 1000, TierRule("Pass", (Y,)))) == "ACCEPT"  # Pass: default allow
    assert verdict(banp) == "DROP"


def test_ports_by_number_range_and_name_and_networks():
    def deny(*ports, peers=(Y,)):
        return cnp("d", "Admin", 1, TierRule("Deny", peers, tuple(ports)))
    assert verdict(deny(TierPort("TCP", 80))) == "DROP"
    assert verdict(deny(TierPort("TCP", 81))) == "ACCEPT"
    assert verdict(deny(TierPort("UDP", 80))) == "ACCEPT"
    assert verdict(deny(TierPort("TCP", 79, 81))) == "DROP"
    assert verdict(deny(TierPort(None, name="http"))) == "DROP"
    assert verdict(deny(TierPort(None, name="http")), dport=81) == "ACCEPT"
    assert verdict(deny(TierPort(None, name="dns"))) == "ACCEPT"
    assert verdict(deny(peers=(TierPeer(networks=("10.0.0.0/30",)),))) == "DROP"
    assert verdict(deny(peers=(TierPeer(networks=("10.0.0.4/30", "fd00::/8")),))) == "ACCEPT"
    # egress to a CIDR, for the client as subject
    eg = cnp("e", "Admin", 1, subject=Y, egress=(TierRule("Deny", (TierPeer(networks=("10.0.0.3/32",)),)),))
    assert verdict(eg) == "DROP"
    assert verdict(eg, dst="10.0.0.3") == "DROP"


def test_subject_by_pods_and_one_shared_chain_per_policy():
    subj = TierPeer(pods=NamespacedPods(LabelSelector(), sel(app="s")))
    assert verdict(cnp("d", "Admin", 1, TierRule("Deny", (Y,)), subject=subj)) == "DROP"
    other = TierPeer(pods=NamespacedPods(LabelSelector(), sel(app="nope")))
    assert verdict(cnp("d", "Admin", 1, TierRule("Deny", (Y,)), subject=other)) == "ACCEPT"
    c = cluster_of(pod("x", "s1", "10.0.0.5"), pod("x", "s2", "10.0.0.6"),
                   cnp("d", "Admin", 1, TierRule("Deny", (Y,))))
    chains = state(c).chains["filter"]
    pid = cnp("d", "Admin", 1).id
    assert [n for n in chains if n.startswith("cali-c")] == [f"cali-ci-{pid}"]
    assert all(f"-j cali-ci-{pid}" in chains[f"cali-tw-{iface_of('x', p)}"] for p in ("s1", "s2"))


def test_a_label_change_touches_set_members_only():
    peer = TierPeer(pods=NamespacedPods(LabelSelector(), sel(app="c")))
    policy = cnp("d", "Admin", 1, TierRule("Deny", (peer,)))
    before = state(cluster_of(pod("y", "c", "10.0.0.2", labels={"app": "c"}), pod("x", "s", "10.0.0.3"), policy))
    after = state(cluster_of(pod("y", "c", "10.0.0.2", labels={"app": "d"}), pod("x", "s", "10.0.0.3"), policy))
    assert before.chains == after.chains
    assert before.ipsets != after.ipsets


def test_egress_to_nodes_by_label_follows_node_records():
    from felix_agent.model import Node
    from felix_agent.calc.trace import trace as trace_
    to_ctl = cnp("nodes", "Admin", 1, subject=Y, egress=(TierRule("Deny", (TierPeer(nodes=sel(role="ctl")),),
                                                                  (TierPort("TCP", 6443),)),))
    n1 = Node("n1", ip="192.168.100.11/24", labels=(("role", "ctl"),))
    n2 = Node("n2", ip="192.168.100.12/24")
    c = cluster_of(Namespace("y"), pod("y", "c", "10.0.0.2"), to_ctl, n1, n2)
    client = c.endpoints()[0]
    assert not trace_(c, client, "192.168.100.11", 6443, "tcp").allowed
    assert trace_(c, client, "192.168.100.11", 443, "tcp").allowed
    assert trace_(c, client, "192.168.100.12", 6443, "tcp").allowed
    before = state(c)
    c.apply(upd(Node("n2", ip="192.168.100.12/24", labels=(("role", "ctl"),))))
    after = state(c)
    assert before.chains == after.chains  # a node label change moves set members only
    assert not trace_(c, client, "192.168.100.12", 6443, "tcp").allowed
