"""Dual-stack and IPv6-only routing through the whole stack: real etcd, a tortie-agent with
its BIRD in every node namespace of a lab whose nodes have IPv4 and IPv6 addresses on the
lab bridge, pods wired by the real CNI binary through the agents, real packets.

Every pod gets one address of each family in its one CNI ADD; every pod pair reaches each
other over IPv4 and IPv6 (TCP to a server that answers with the client address it saw, so
the same exchange proves no NAT between pods, and ping); every node holds exactly the
routes the mode calls for, for both families.  IPIP is not here: it carries IPv4 only (an
IPv6 pool refuses mode ipip, as Calico has no IPv6 IPIP) and this kernel has no ipip module.
"""
from __future__ import annotations

import ipaddress
import json

import pytest

from felix_agent.calc.routes import vtep_for
from felix_agent.datastore.convert import from_k8s
from tests.lab.cluster import LabCluster, LabPod, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root

POOL6 = "fd00:10:65::/112"
BLOCK6 = 122  # Calico's IPv6 default, which the pool gets by leaving blockSize out
PORT = 8080


def route6(c: LabCluster, node: str, dst: str) -> str:
    """The IPv6 main-table route for exactly `dst` on `node`, one line, spaces normalised,
    without the kernel's IPv6 defaults ("metric 1024", "pref medium") so it reads like IPv4's."""
    words = sh("ip", "-6", "route", "show", "exact", dst, ns=c.lab.node(node).ns).stdout.split()
    return " ".join(words).replace(" metric 1024", "").replace(" pref medium", "")


def route4(c: LabCluster, node: str, dst: str) -> str:
    return " ".join(c.routes(node, "exact", dst).split())


def block(ip: str, plen: int) -> str:
    return str(ipaddress.ip_network(f"{ip}/{plen}", strict=False))


def wait_route(get, c: LabCluster, node: str, dst: str, frag: str, timeout: float = 45) -> None:
    try:
        wait_for(lambda: frag in get(c, node, dst), timeout=timeout, what=f"{node}: route {dst} {frag}")
    except AssertionError:
        raise AssertionError(f"{node}: route to {dst} is {get(c, node, dst)!r}, want {frag!r}") from None


def expected(mode: str, version: int, peer, peer_block: str) -> str:
    gw = peer.ip if version == 4 else peer.ip6
    if mode == "bgp":
        return f"via {gw} dev eth0 proto bird"
    if mode == "direct":
        return f"via {gw} dev eth0 proto 80 onlink"
    dev = "vxlan.calico" if version == 4 else "vxlan-v6.calico"
    return f"via {vtep_for(peer.name, peer_block)[0]} dev {dev} proto 80 onlink"


def check_cluster(c: LabCluster, mode: str, families: tuple[int, ...]) -> list[LabPod]:
    nodes = {n.name: n for n in c.lab.nodes}
    pods = [c.add_pod("default", f"p{n[4:]}", n, serve=[f"who:{PORT}"]) for n in nodes]
    for p in pods:
        # one ADD: one address of each family, a default route for each
        fams = sorted(ipaddress.ip_interface(i["address"]).version for i in p.result["ips"])
        assert fams == list(families), p.result
        assert sorted(r["dst"] for r in p.result["routes"]) == sorted(
            {4: "0.0.0.0/0", 6: "::/0"}[v] for v in families), p.result
    for version in families:
        get = route4 if version == 4 else route6
        plen = 26 if version == 4 else BLOCK6
        blocks = {p.node: block(p.ip if version == 4 else p.ip6, plen) for p in pods}
        for me in nodes:
            for other in nodes:
                if other != me:
                    wait_route(get, c, me, blocks[other], expected(mode, version, nodes[other], blocks[other]))
            own = get(c, me, blocks[me])
            assert own.startswith(f"blackhole {blocks[me]}") and "proto 80" in own, own
        if mode == "vxlan":
            recs = {r.name: r for r in map(from_k8s, json.loads(c.tortiectl("get", "nodes", "-o", "json").stdout)["items"])}
            for n in nodes:  # each agent published the VTEP of each family the routes use
                assert recs[n].vtep_of(version) == vtep_for(n, blocks[n]), recs[n]
    for src in pods:
        for dst in pods:
            if dst is src:
                continue
            for version in families:
                s_ip, d_ip = (src.ip, dst.ip) if version == 4 else (src.ip6, dst.ip6)
                # the receiver sees the sender's own pod address: no NAT between pods
                assert c.peer_seen(src, d_ip, PORT) == s_ip, f"{src.key} -> {dst.key} over IPv{version}"
                assert c.ping(src, d_ip), f"ping {src.key} -> {dst.key} ({d_ip})"
    return pods


def check_del_releases_both(c: LabCluster, pods: list[LabPod]) -> None:
    for p in pods:
        assert c.del_pod(p).returncode == 0
    for n in c.lab.nodes:
        assert c.status(n.name)["ipam"]["allocations"] == 0


@pytest.mark.parametrize("mode", ["bgp", "direct", "vxlan"])
def test_dual_stack_three_nodes_every_pod_pair_over_both_families(make_cluster, mode):
    c = make_cluster(3, mode=mode, pool6=POOL6)
    pods = check_cluster(c, mode, (4, 6))
    nodes = {n.name: n for n in c.lab.nodes}
    if mode == "bgp":
        for me in nodes:  # an IPv4 and an IPv6 session to every other node
            want = {f"Mesh_{n.ip.replace('.', '_')}" for o, n in nodes.items() if o != me} | \
                   {f"Mesh_{n.ip6.replace(':', '_')}" for o, n in nodes.items() if o != me}
            wait_for(lambda: {p["name"] for p in c.status(me)["bgp_peers"]
                              if p["info"].startswith("Established")} == want, timeout=45,
                     what=f"{me}'s IPv4 and IPv6 sessions")
    check_del_releases_both(c, pods)


@pytest.mark.parametrize("mode,ipv4_nodes", [("bgp", True), ("vxlan", True), ("bgp", False), ("direct", False)])
def test_ipv6_only_cluster(make_cluster, mode, ipv4_nodes):
    """No IPv4 pool; with ipv4_nodes False the nodes have no IPv4 address either (BIRD's
    router id is then hashed from the node name, and it runs IPv6 sessions only)."""
    c = make_cluster(3, mode=mode, pool="", pool6=POOL6, ipv4_nodes=ipv4_nodes)
    pods = check_cluster(c, mode, (6,))
    for p in pods:
        assert not p.ip
    check_del_releases_both(c, pods)


def test_nat_outgoing_ipv6_masquerades_to_the_outside_only(make_cluster):
    """An IPv6 natOutgoing pool: a pod reaching an address outside every pool (the lab
    underlay's gateway, which has no route back to pod addresses) is seen as its node's
    IPv6 address (ip6tables nat cali-nat-outgoing); pod to pod stays un-NATed."""
    import subprocess
    import sys

    from tests.lab.cluster import SERVER

    c = make_cluster(2, mode="direct", pool="", pool6=POOL6, start=False)
    c.apply_pool(POOL6, mode="direct", name="pool6", nat_outgoing=True)
    c.start_agents()
    a = c.add_pod("default", "a", "node1", serve=[f"who:{PORT}"])
    b = c.add_pod("default", "b", "node2", serve=[f"who:{PORT}"])
    out = c.lab.popen(c.lab.underlay, [sys.executable, "-c", SERVER, f"who:{PORT}"], stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL, text=True)
    assert out.stdout.readline().strip() == "ready"
    node1 = c.lab.node("node1")
    wait_for(lambda: c.peer_seen(a, "fd00:100::1", PORT) == node1.ip6, timeout=30,
             what="pod a to the outside masqueraded to node1's IPv6 address")
    assert c.peer_seen(a, b.ip6, PORT) == a.ip6  # between pools: no NAT
    saved = sh("ip6tables-save", "-t", "nat", ns=node1.ns).stdout
    assert "-A cali-nat-outgoing -s fd00:10:65::/112" in saved and "MASQUERADE" in saved, saved


def test_restarted_agent_keeps_both_addresses_of_its_dual_stack_pods(make_cluster):
    """After a restart the agent rebuilds its endpoints from the IPAM state: a dual-stack
    pod's two allocations are one endpoint with both addresses (not two half endpoints),
    and the pod stays reachable over both families."""
    c = make_cluster(2, mode="direct", pool6=POOL6)
    a = c.add_pod("default", "a", "node1", serve=[f"who:{PORT}"])
    b = c.add_pod("default", "b", "node2", serve=[f"who:{PORT}"])
    c.stop_agent("node1")
    c.start_agent("node1")
    eps = c.status("node1")["endpoints"]
    assert [(e["pod"], sorted(e["ips"])) for e in eps] == [("a", sorted([a.ip, a.ip6]))], eps
    for ip, want in ((a.ip, b.ip), (a.ip6, b.ip6)):
        assert c.peer_seen(b, ip, PORT) == want


def test_ipv6_vxlan_cross_subnet_encapsulates_only_across_the_router(make_cluster):
    """Two IPv6 subnets joined by a router: within one, a plain route to the peer's IPv6
    address; across it, vxlan-v6.calico over the routed IPv6 underlay."""
    c = make_cluster(3, two_subnets=True, mode="vxlan", cross_subnet=True, pool="", pool6=POOL6)
    nodes = {n.name: n for n in c.lab.nodes}
    assert (nodes["node1"].subnet, nodes["node2"].subnet, nodes["node3"].subnet) == (0, 1, 0)
    pods = {n: c.add_pod("default", f"x{n[4:]}", n, serve=[f"who:{PORT}"]) for n in nodes}
    blocks = {n: block(p.ip6, BLOCK6) for n, p in pods.items()}
    vtep2 = vtep_for("node2", blocks["node2"])[0]
    wait_route(route6, c, "node1", blocks["node3"], f"via {nodes['node3'].ip6} dev eth0 proto 80")
    assert "onlink" not in route6(c, "node1", blocks["node3"])
    wait_route(route6, c, "node1", blocks["node2"], f"via {vtep2} dev vxlan-v6.calico proto 80 onlink")
    for src in pods.values():
        for dst in pods.values():
            if dst is not src:
                assert c.peer_seen(src, dst.ip6, PORT) == src.ip6, f"{src.key} -> {dst.key}"
    rx = int(sh("cat", "/sys/class/net/vxlan-v6.calico/statistics/rx_packets", ns=nodes["node2"].ns).stdout)
    assert rx > 0  # node1 and node3 reached node2 through the tunnel
