"""Behaviour, not text: run the generated chains on packets and compare the verdicts with
an independent reading of the NetworkPolicy rules (hypothesis generates the clusters).

The interpreter (felix_agent.calc.simulate) understands exactly the rule grammar the calc
emits; an unknown token fails the test, so new rule shapes cannot slip past it.
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix_agent.calc.simulate import Packet
from felix_agent.calc.simulate import run as simulate_run
from felix_agent.calc.simulate import run_builtin
from felix_agent.model import (
    IPBlock,
    LabelSelector,
    NamedPort,
    Namespace,
    NetworkPolicy,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
)
from tests.unit.test_calc_fixtures import cluster_of, iface_of, pod, state

# --- the packets run through felix_agent.calc.simulate (a tiny iptables) ------------------


def run(chains, name: str, pkt: Packet, ipsets) -> str | None:
    """'ACCEPT' / 'DROP', or None when the chain returns."""
    return simulate_run(chains, name, pkt, ipsets).verdict


def forward(s, pkt: Packet) -> str | None:
    """The verdict of built-in FORWARD as programmed (our top hook, then our last rule) in
    the table of the packet's family (ip6tables for IPv6): 'ACCEPT' / 'DROP', or None when
    neither decided (the chain's policy does)."""
    chains, hooks = (s.chains6, s.hooks6) if ":" in pkt.src else (s.chains, s.hooks)
    return run_builtin(chains["filter"], hooks, "filter", "FORWARD", pkt, s.ipsets).verdict


# --- reference semantics (from the API docs, not from the calc) --------------------------


def sel_match(s: LabelSelector, labels: dict) -> bool:
    return s.matches(labels)


def peer_match(peer: PolicyPeer, policy_ns: str, other: dict) -> bool:
    if peer.ip_block is not None:
        ip = ipaddress.ip_address(other["ip"])
        return ip in ipaddress.ip_network(peer.ip_block.cidr) and not any(
            ip in ipaddress.ip_network(e) for e in peer.ip_block.except_)
    if peer.namespace_selector is None:
        in_scope = other["ns"] == policy_ns
    else:
        in_scope = sel_match(peer.namespace_selector, other["ns_labels"])
    return in_scope and sel_match(peer.pod_selector or LabelSelector(), other["labels"])


def port_match(p: PolicyPort, proto: str, dport: int, dst: dict) -> bool:
    if p.protocol.lower() != proto:
        return False
    if p.port is None:
        return True
    if isinstance(p.port, str):
        return any(np.name == p.port and np.protocol == p.protocol and np.port == dport for np in dst["ports"])
    return p.port <= dport <= (p.end_port or p.port)


def allowed(policies, direction: str, me: dict, other: dict, proto: str, dport: int, dst: dict) -> bool:
    ptype = "Ingress" if direction == "ingress" else "Egress"
    mine = [p for p in policies if ptype in p.policy_types and p.namespace == me["ns"]
            and sel_match(p.pod_selector, me["labels"])]
    if not mine:
        return True
    for p in mine:
        for r in (p.ingress if direction == "ingress" else p.egress):
            if (not r.peers or any(peer_match(x, p.namespace, other) for x in r.peers)) and \
               (not r.ports or any(port_match(x, proto, dport, dst) for x in r.ports)):
                return True
    return False


# --- the generated clusters -----------------------------------------------------------------

LBL = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["a", "b"]), max_size=2)
SEL = st.builds(lambda d: LabelSelector(tuple(sorted(d.items()))), LBL)
NAMED = st.lists(st.builds(NamedPort, st.sampled_from(["http", "dns"]), st.sampled_from([80, 81, 53]),
                           st.sampled_from(["TCP", "UDP"])), max_size=2, unique_by=lambda n: n.name)
PORT = st.one_of(
    st.builds(PolicyPort, st.sampled_from(["TCP", "UDP", "SCTP"]), st.sampled_from([None, 53, 80, 81])),
    st.builds(lambda proto: PolicyPort(proto, 80, 81), st.sampled_from(["TCP", "SCTP"])),
    st.builds(PolicyPort, st.sampled_from(["TCP", "UDP"]), st.sampled_from(["http", "dns"])),
)
PEER = st.one_of(
    st.builds(lambda s: PolicyPeer(pod_selector=s), SEL),
    st.builds(lambda s: PolicyPeer(namespace_selector=s), SEL),
    st.builds(lambda a, b: PolicyPeer(pod_selector=a, namespace_selector=b), SEL, SEL),
    st.sampled_from([PolicyPeer(ip_block=IPBlock("10.0.0.0/8", ("10.0.1.0/24",))),
                     PolicyPeer(ip_block=IPBlock("0.0.0.0/0", ("10.0.0.2/32",))),
                     PolicyPeer(ip_block=IPBlock("10.0.0.0/30"))]),
)


def policies_of(peer) -> st.SearchStrategy:
    """NetworkPolicies in x or y whose rules take their peers from `peer`."""
    rule = st.builds(lambda peers, ports: PolicyRule(tuple(peers), tuple(ports)),
                     st.lists(peer, max_size=2), st.lists(PORT, max_size=2))
    return st.builds(
        lambda i, ns, s, ing, eg, types: NetworkPolicy(ns, f"p{i}", s, tuple(ing), tuple(eg), types),
        st.integers(0, 1000), st.sampled_from(["x", "y"]), SEL, st.lists(rule, max_size=2),
        st.lists(rule, max_size=2),
        st.sampled_from([("Ingress",), ("Egress",), ("Ingress", "Egress")]))


POLICY = policies_of(PEER)
POD = st.tuples(st.sampled_from(["x", "y"]), LBL, st.sampled_from(["n1", "n2"]), NAMED)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pods=st.lists(POD, min_size=2, max_size=4), policies=st.lists(POLICY, max_size=3, unique_by=lambda p: p.key),
       ns_x=LBL, ns_y=LBL)
def test_forward_verdicts_match_the_reference(pods, policies, ns_x, ns_y):
    info, c = make_world(pods, {"x": ns_x, "y": ns_y}, *policies)
    for a, b, proto, dport, got in forward_verdicts(c, info, (("tcp", 80), ("tcp", 81), ("udp", 53), ("sctp", 80),
                                                              ("udp", 80))):
        want = ((a["node"] != "n1" or allowed(policies, "egress", a, b, proto, dport, b)) and
                (b["node"] != "n1" or allowed(policies, "ingress", b, a, proto, dport, b)))
        assert got == ("ACCEPT" if want else "DROP"), (a, b, proto, dport)


PEER6 = st.one_of(PEER, st.sampled_from([PolicyPeer(ip_block=IPBlock("fd00::/16", ("fd00:0:0:1::/64",))),
                                          PolicyPeer(ip_block=IPBlock("::/0", ("fd00::2/128",))),
                                          PolicyPeer(ip_block=IPBlock("fd00::/126"))]))
POLICY6 = policies_of(PEER6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pods=st.lists(POD, min_size=2, max_size=4), policies=st.lists(POLICY6, max_size=3, unique_by=lambda p: p.key),
       ns_x=LBL, ns_y=LBL)
def test_dual_stack_verdicts_match_the_reference_in_each_family(pods, policies, ns_x, ns_y):
    """Dual-stack pods, ipBlocks of both families: the iptables chains decide IPv4 and the
    ip6tables chains IPv6 as the API says, each family on its own (an ipBlock of one family
    matches nothing of the other; selectors and ports mean the same in both)."""
    for family in (4, 6):
        info, c = make_world(pods, {"x": ns_x, "y": ns_y}, *policies, family=family, dual=True)
        for a, b, proto, dport, got in forward_verdicts(c, info, (("tcp", 80), ("udp", 53), ("tcp", 81))):
            want = ((a["node"] != "n1" or allowed(policies, "egress", a, b, proto, dport, b)) and
                    (b["node"] != "n1" or allowed(policies, "ingress", b, a, proto, dport, b)))
            assert got == ("ACCEPT" if want else "DROP"), (family, a, b, proto, dport)


def make_world(pods, namespaces: dict, *records, family: int = 4, dual: bool = False) -> tuple[list[dict], object]:
    """Generated pods q0.. (namespace, labels, node, named ports) as reference dicts, and
    the cluster holding them, the namespaces and `records`.  dual: every pod has an IPv4
    and an IPv6 address, and "ip" in the dicts is the one of `family`."""
    info, recs = [], []
    for i, (ns, labels, node, ports) in enumerate(pods):
        ip4, ip6 = f"10.0.{i % 2}.{i + 2}", f"fd00:0:0:{i % 2}::{i + 2:x}"
        recs.append(pod(ns, f"q{i}", ip4, node=node, labels=labels, ports=tuple(ports), ip6=ip6 if dual else ""))
        ip = ip6 if family == 6 else ip4
        info.append({"ns": ns, "labels": labels, "node": node, "ip": ip, "ports": ports, "key": f"{ns}/q{i}",
                     "iface": iface_of(ns, f"q{i}"),
                     "ns_labels": {**namespaces[ns], "kubernetes.io/metadata.name": ns}})
    c = cluster_of(*[Namespace(n, tuple(sorted(lab.items()))) for n, lab in namespaces.items()], *recs, *records)
    return info, c


def forward_verdicts(c, info: list[dict], ports):
    """(a, b, proto, dport, verdict of n1's FORWARD) for every pair with a pod on n1."""
    s = state(c)
    for a in info:
        for b in info:
            if a is b or (a["node"] != "n1" and b["node"] != "n1"):
                continue
            for proto, dport in ports:
                pkt = Packet(a["ip"], b["ip"], proto, dport,
                             in_iface=a["iface"] if a["node"] == "n1" else "eth0",
                             out_iface=b["iface"] if b["node"] == "n1" else "eth0")
                yield a, b, proto, dport, forward(s, pkt)


def test_spoofed_and_unknown_sources_are_dropped_and_host_paths():
    c = cluster_of(pod("x", "web", "10.0.0.5"), pod("x", "cli", "10.0.0.6"))
    web, cli = iface_of("x", "web"), iface_of("x", "cli")
    for action in ("ACCEPT", "DROP"):
        s = state(c, wl_to_host_action=action)
        f = s.chains["filter"]
        fwd = lambda **kw: forward(s, Packet(proto="tcp", dport=80, **kw))
        assert fwd(src="10.0.0.6", dst="10.0.0.5", in_iface=cli, out_iface=web) == "ACCEPT"
        assert fwd(src="10.0.0.5", dst="10.0.0.5", in_iface=cli, out_iface=web) == "DROP"  # spoof
        assert fwd(src="10.0.0.9", dst="10.0.0.5", in_iface="cali0000000dead", out_iface=web) == "DROP"
        assert fwd(src="10.0.9.9", dst="10.0.0.9", in_iface="eth0", out_iface="cali0000000dead") == "DROP"
        assert fwd(src="1.1.1.1", dst="2.2.2.2", in_iface="eth0", out_iface="eth1") is None  # not ours
        to_host = lambda src, iface: run(f, "cali-INPUT", Packet(src, "192.168.100.11", "tcp", 22, in_iface=iface), s.ipsets)
        assert to_host("10.0.0.5", web) == action
        assert to_host("10.0.0.6", web) == "DROP"  # spoofing towards the host too
        assert to_host("192.168.100.1", "eth0") is None  # the host's own firewall decides
        # host -> pod (kubelet probes) never meets a drop
        assert run(f, "cali-OUTPUT", Packet("192.168.100.11", "10.0.0.5", "tcp", 8080, out_iface=web), s.ipsets) is None
