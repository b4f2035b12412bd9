"""The NetworkPolicy truth table over dual-stack pods: every case of
test_netpol_truth_table.py, each matrix probed over IPv4 and over IPv6 (real iptables and
ip6tables, ipsets of both families, real packets), compared exactly with the reference
evaluator run on the pods' addresses of that family, and `tortiectl trace` agreeing on
every cell of both; likewise the cluster policy cases of test_cnp_truth_table.py.  The
cases' ipBlocks and networks are IPv4, so their IPv6 matrices show the rule acting in its
own family only; the cases below add IPv6 and mixed ones.  Then: a
spoofed IPv6 source is dropped at the sender, and ICMPv6 neighbour discovery keeps working
for a pod behind deny-all.  Last, the cases that name no pod's IPv4 address again in an
IPv6-only cluster (no IPv4 pool).

Same world as the IPv4 module (namespaces x, y, z; pods a, b on node1, c on node2) on a
dual-stack underlay with a second, IPv6 pool: every pod gets an address of each family in
its one CNI ADD, and the agents route IPv6 between the nodes (BIRD's IPv6 sessions).
"""
from __future__ import annotations

import re

import pytest

from tests.integration.test_netpol_truth_table import (
    CASES,
    POOL,
    Case,
    World,
    build_world,
    check_spoofing,
    host,
    ml,
    pol,
)
from tests.integration.test_cnp_truth_table import CASES as CNP_CASES
from tests.integration.test_cnp_truth_table import cnp, eg, in_ns, pods
from tests.lab import sh
from tests.lab.cluster import wait_for
from tests.lab.prober import OK, TIMEOUT, Probe, flush_conntrack

pytestmark = pytest.mark.root

POOL6 = "fd65::/48"


def host6(ip: str) -> str:
    return f"{ip}/128"


@pytest.fixture(scope="module")
def world(lab_prefix, tmp_path_factory):
    yield from build_world(f"{lab_prefix}-np6", str(tmp_path_factory.mktemp("netpol6")), pool6=POOL6)


A = ml(pod="a")

CASES6 = [
    Case("ipv6-block-with-except", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"ipBlock": {"cidr": POOL6,
                                                          "except": [host6(ip["y/a@6"]), host6(ip["z/c@6"])]}}]}])]),
    Case("ipv6-block-one-pod-and-ipv4-block-another", lambda ip: [
        pol("p", "x", ingress=[{"from": [{"ipBlock": {"cidr": host6(ip["z/c@6"])}},
                                         {"ipBlock": {"cidr": host(ip["y/b"])}}]}])]),
    Case("ipv4-block-rule-and-selector-rule", lambda ip: [
        # IPv6 from y/* comes only through the selector rule, on port 81 only
        pol("p", "x", A, ingress=[{"from": [{"ipBlock": {"cidr": POOL}}]},
                                  {"from": [{"namespaceSelector": ml(ns="y")}], "ports": [{"port": 81}]}])]),
    Case("ipv6-everything-except-one", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"ipBlock": {"cidr": "::/0", "except": [host6(ip["x/b@6"])]}}]}])]),
    Case("egress-ipv6-block-with-except", lambda ip: [
        pol("p", "x", egress=[{"to": [{"ipBlock": {"cidr": POOL6, "except": [host6(ip["y/c@6"])]}}]}],
            types=["Egress"])]),
    Case("egress-both-families-named-port", lambda ip: [
        pol("p", "x", egress=[{"to": [{"ipBlock": {"cidr": POOL}}, {"ipBlock": {"cidr": POOL6}}],
                               "ports": [{"port": "web"}]}], types=["Egress"])]),
]
CNP_CASES6 = [
    Case("cnp-egress-deny-ipv6-networks-only", lambda ip: [
        cnp("deny-to-hosts6", "Admin", 10, pods(ml(pod="a")),
            egress=[eg("Deny", {"networks": [host6(ip["y/c@6"]), host6(ip["z/b@6"])]})])]),
    Case("cnp-egress-accept-both-families-over-networkpolicy-deny", lambda ip: [
        pol("deny-egress", "x", types=["Egress"]),
        cnp("accept-to-z-a", "Admin", 10, in_ns("x"),
            egress=[eg("Accept", {"networks": [host(ip["z/a"]), host6(ip["z/a@6"])]})])]),
    Case("baseline-egress-deny-all-ipv6", lambda ip: [
        cnp("no-v6-out", "Baseline", 10, in_ns("y"), egress=[eg("Deny", {"networks": ["::/0"]})])]),
]
ALL = CASES + CASES6 + CNP_CASES + CNP_CASES6


@pytest.mark.parametrize("case", ALL, ids=[c.name for c in ALL])
def test_truth_table_both_families(world: World, case: Case):
    if case.needs_sctp and not world.sctp:
        pytest.skip("the kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) failed in a lab namespace)")
    world.run_case(case)


def test_spoofed_ipv6_source_is_dropped_at_the_sender(world: World):
    """x/a (node1) sends to y/c (node2) from IPv6 addresses it does not own (a free pool
    address, its neighbour x/b's): ip6tables' anti-spoofing DROP on node1 counts them and
    node2 never sees them; the same probes from its own IPv6 address pass."""
    check_spoofing(world, 6, "fd65::ffff:fff0")


def _neighbours(ns: str, dev: str) -> str:
    return sh("ip", "-6", "neigh", "show", "dev", dev, ns=ns).stdout


def test_neighbour_discovery_works_behind_deny_all(world: World):
    """x/a is behind deny-all in both directions except ingress from y/b.  With every
    IPv6 neighbour entry flushed on both sides of its veth, y/b still connects to it over
    IPv6: the node must resolve x/a (x/a's neighbour advertisement reaches the node through
    ip6tables INPUT) and x/a must resolve its gateway for the reply (its neighbour
    solicitation, from its link-local address, likewise) while its egress policy allows
    nothing.  Its other IPv6 traffic stays denied."""
    a, b = world.pods["x/a"], world.pods["y/b"]
    node1 = world.cluster.lab.node("node1").ns
    policies = [pol("deny-all", "x", A, types=["Ingress", "Egress"]),
                pol("from-yb", "x", A, ingress=[{"from": [{"namespaceSelector": ml(ns="y"),
                                                          "podSelector": ml(pod="b")}]}])]
    try:
        world.cluster.apply(policies)
        world.wait_programmed(policies)
        world.check(policies)
        sh("ip", "-6", "neigh", "flush", "dev", "eth0", ns=a.ns)
        sh("ip", "-6", "neigh", "flush", "dev", a.iface, ns=node1)
        wait_for(lambda: a.ip6 not in _neighbours(node1, a.iface), timeout=5, what="the node forgot x/a")
        flush_conntrack(world.node_namespaces)
        assert world.probers["y/b"].run([Probe(a.ip6, 80, "tcp", 3.0)]) == [OK]
        assert re.search(rf"^{re.escape(a.ip6)} .*lladdr", _neighbours(node1, a.iface), re.M), \
            "the node did not learn x/a's link address"
        assert "lladdr" in _neighbours(a.ns, "eth0"), "x/a did not learn its gateway's link address"
        assert world.probers["x/a"].run([Probe(b.ip6, 80, "tcp", 1.0)]) == [TIMEOUT]  # egress still denied
    finally:
        world.reset(policies)


@pytest.fixture(scope="module")
def world6(lab_prefix, tmp_path_factory):
    """The same world IPv6-only: no IPv4 pool, the pods have IPv6 addresses alone."""
    yield from build_world(f"{lab_prefix}-np6o", str(tmp_path_factory.mktemp("netpol6only")), pool6=POOL6,
                           ipv4=False)


def _ipv6_only(case: Case) -> bool:
    """Whether the case's policies can be written without IPv4 addresses of pods (its
    IPv4 blocks of constant CIDRs stay: they match nothing here)."""
    try:
        case.policies({f"{ns}/{p}@6": "fd65::1" for ns in "xyz" for p in "abc"})
    except KeyError:
        return False
    return not case.needs_sctp


IPV6_ONLY = [c for c in ALL if _ipv6_only(c)]


@pytest.mark.parametrize("case", IPV6_ONLY, ids=[c.name for c in IPV6_ONLY])
def test_truth_table_ipv6_only(world6: World, case: Case):
    world6.run_case(case)
