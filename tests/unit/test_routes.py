"""Pure route calculation between nodes: felix_agent.calc.routes."""
import pytest

from felix_agent.calc.desired import FDBEntry, Neighbor, Route
from felix_agent.calc.routes import (blocks_by_node, local_block_routes, pool_for, remote_routes,
                                     tunnel_block, unreachable_direct_nodes, vtep_for, vtep_mac,
                                     vxlan_peers)
from felix_agent.model import BlockAffinity, IPPool, Node

N1 = Node("node1", "192.168.100.11/24")
N2 = Node("node2", "192.168.100.12/24")
N3 = Node("node3", "192.168.200.13/24")  # another subnet
NODES = [N1, N2, N3]
BLOCKS = [BlockAffinity("10.65.1.0/26", "node1"), BlockAffinity("10.65.2.0/26", "node2"),
          BlockAffinity("10.65.3.0/26", "node3")]


def pool(mode, cross=False, **kw):
    return IPPool("p", "10.65.0.0/16", mode=mode, cross_subnet=cross, **kw)


def with_vteps(nodes):
    out = []
    for n, b in zip(nodes, ["10.65.1.0/26", "10.65.2.0/26", "10.65.3.0/26"]):
        addr, mac = vtep_for(n.name, b)
        out.append(Node(n.name, n.ip, vxlan_tunnel_addr=addr, vxlan_tunnel_mac=mac))
    return out


def test_direct_same_subnet_only():
    got = remote_routes(NODES, [pool("direct")], BLOCKS, "node1")
    assert got == {Route("10.65.2.0/26", dev="eth0", gateway="192.168.100.12", onlink=True)}
    # node3 is behind a router: no route, and the agent can name it
    assert unreachable_direct_nodes(NODES, [pool("direct")], BLOCKS, "node1") == ("node3",)
    assert unreachable_direct_nodes(NODES, [pool("direct")], BLOCKS, "node2") == ("node3",)
    assert unreachable_direct_nodes(NODES, [pool("vxlan")], BLOCKS, "node1") == ()


def test_uplink_name_is_used():
    got = remote_routes(NODES[:2], [pool("direct")], BLOCKS, "node1", uplink="ens3")
    assert {r.dev for r in got} == {"ens3"}


def test_vxlan_routes_via_remote_vtep():
    nodes = with_vteps(NODES)
    got = remote_routes(nodes, [pool("vxlan")], BLOCKS, "node1")
    assert got == {
        Route("10.65.2.0/26", dev="vxlan.calico", gateway="10.65.2.0", onlink=True),
        Route("10.65.3.0/26", dev="vxlan.calico", gateway="10.65.3.0", onlink=True),
    }


def test_vxlan_node_without_vtep_gets_no_route_yet():
    nodes = with_vteps(NODES)
    nodes[2] = Node("node3", "192.168.200.13/24")  # has not published its VTEP
    got = remote_routes(nodes, [pool("vxlan")], BLOCKS, "node1")
    assert {r.dst for r in got} == {"10.65.2.0/26"}


def test_vxlan_cross_subnet_plain_next_hop_on_my_subnet():
    nodes = with_vteps(NODES)
    got = remote_routes(nodes, [pool("vxlan", cross=True)], BLOCKS, "node1")
    assert got == {
        Route("10.65.2.0/26", dev="eth0", gateway="192.168.100.12"),
        Route("10.65.3.0/26", dev="vxlan.calico", gateway="10.65.3.0", onlink=True),
    }


def test_ipip_and_cross_subnet():
    assert remote_routes(NODES, [pool("ipip")], BLOCKS, "node1") == {
        Route("10.65.2.0/26", dev="tunl0", gateway="192.168.100.12", onlink=True),
        Route("10.65.3.0/26", dev="tunl0", gateway="192.168.200.13", onlink=True),
    }
    assert remote_routes(NODES, [pool("ipip", cross=True)], BLOCKS, "node1") == {
        Route("10.65.2.0/26", dev="eth0", gateway="192.168.100.12"),
        Route("10.65.3.0/26", dev="tunl0", gateway="192.168.200.13", onlink=True),
    }


def test_bgp_mode_is_birds_job_but_the_local_blackhole_is_ours():
    assert remote_routes(NODES, [pool("bgp")], BLOCKS, "node1") == frozenset()
    got = local_block_routes(NODES, [pool("bgp")], BLOCKS, "node1")
    assert {(r.dst, r.type) for r in got} == {(b.cidr, "blackhole") for b in BLOCKS if b.node == "node1"}


def test_mixed_pools_each_block_by_its_own_pool():
    pools = [IPPool("a", "10.65.0.0/16", mode="direct"), IPPool("b", "10.66.0.0/16", mode="bgp")]
    blocks = BLOCKS + [BlockAffinity("10.66.2.0/26", "node2")]
    assert {r.dst for r in remote_routes(NODES, pools, blocks, "node1")} == {"10.65.2.0/26"}


def test_stale_node_removed_gives_no_routes():
    # node2 deleted, its affinity not yet released: nothing may route to a ghost
    got = remote_routes([N1, N3], [pool("ipip")], BLOCKS, "node1")
    assert {r.dst for r in got} == {"10.65.3.0/26"}
    assert "node2" not in blocks_by_node([N1, N3], BLOCKS)


def test_unknown_self_routes_nothing():
    assert remote_routes(NODES, [pool("ipip")], BLOCKS, "nodeX") == frozenset()


def test_blocks_outside_pools_or_in_disabled_pools_not_routed():
    assert remote_routes(NODES, [IPPool("o", "10.99.0.0/16", mode="ipip")], BLOCKS, "node1") == frozenset()
    assert remote_routes(NODES, [pool("ipip", disabled=True)], BLOCKS, "node1") == frozenset()


def test_kubernetes_mode_pod_cidrs_are_blocks():
    nodes = [Node("a", "192.168.100.11/24", pod_cidrs=("10.244.0.0/24",)),
             Node("b", "192.168.100.12/24", pod_cidrs=("10.244.1.0/24",))]
    pools = [IPPool("k", "10.244.0.0/16", mode="direct")]
    assert remote_routes(nodes, pools, [], "a") == {
        Route("10.244.1.0/24", dev="eth0", gateway="192.168.100.12", onlink=True)}
    assert local_block_routes(nodes, pools, [], "a") == {Route("10.244.0.0/24", type="blackhole")}


def test_mapping_inputs_accepted():
    nodes = {n.name: n for n in NODES}
    blocks = {b.cidr: b for b in BLOCKS}
    pools = {"p": pool("direct")}
    assert len(remote_routes(nodes, pools, blocks, "node1")) == 1


def test_local_block_routes_kinds():
    assert local_block_routes(NODES, [pool("vxlan")], BLOCKS, "node1") == {
        Route("10.65.1.0/26", type="blackhole")}
    assert local_block_routes(NODES, [pool("ipip")], BLOCKS, "node1", kind="unreachable") == {
        Route("10.65.1.0/26", type="unreachable")}
    with pytest.raises(ValueError, match="blackhole or unreachable"):
        local_block_routes(NODES, [pool("ipip")], BLOCKS, "node1", kind="prohibit")


def test_pool_for_most_specific_enabled():
    pools = [IPPool("big", "10.0.0.0/8"), IPPool("small", "10.65.0.0/16", mode="vxlan"),
             IPPool("off", "10.65.1.0/24", disabled=True)]
    assert pool_for("10.65.1.0/26", pools).name == "small"
    assert pool_for("10.1.0.0/26", pools).name == "big"
    assert pool_for("192.168.0.0/26", pools) is None


def test_vxlan_peers():
    nodes = with_vteps(NODES)
    fdb, neigh = vxlan_peers(nodes, [pool("vxlan")], "node1")
    a2, m2 = vtep_for("node2", "10.65.2.0/26")
    a3, m3 = vtep_for("node3", "10.65.3.0/26")
    assert fdb == {FDBEntry(m2, "192.168.100.12"), FDBEntry(m3, "192.168.200.13")}
    assert neigh == {Neighbor(a2, m2), Neighbor(a3, m3)}
    # no vxlan pool: no entries
    assert vxlan_peers(nodes, [pool("ipip")], "node1") == (frozenset(), frozenset())


def test_vtep_mac_is_stable_unicast_local():
    m = vtep_mac("node1")
    assert m == vtep_mac("node1") != vtep_mac("node2")
    first = int(m[:2], 16)
    assert first & 0x02 and not first & 0x01
    assert vtep_for("node1", "10.65.1.0/26") == ("10.65.1.0", m)
    with pytest.raises(ValueError):
        vtep_mac("")


def test_tunnel_block_is_first_block_in_mode_pool():
    pools = [IPPool("v", "10.65.0.0/16", mode="vxlan"), IPPool("b", "10.66.0.0/16")]
    blocks = [BlockAffinity("10.65.9.0/26", "node1"), BlockAffinity("10.65.1.64/26", "node1"),
              BlockAffinity("10.66.0.0/26", "node1")]
    assert tunnel_block(NODES, pools, blocks, "node1", "vxlan") == "10.65.1.64/26"
    assert tunnel_block(NODES, pools, blocks, "node1", "ipip") is None


def test_derived_vteps_route_vxlan_without_published_ones():
    """Kubernetes mode: nobody can publish a VTEP, every agent derives the same ones."""
    from felix_agent.calc.routes import with_derived_vteps

    bare = [Node(n.name, n.ip) for n in NODES]
    assert remote_routes(bare, [pool("vxlan")], BLOCKS, "node1") == frozenset()  # nothing published
    derived = with_derived_vteps(bare, [pool("vxlan")], BLOCKS)
    assert derived == with_vteps(NODES)  # exactly what each node would have published
    got = remote_routes(derived, [pool("vxlan")], BLOCKS, "node1")
    assert {(r.dst, r.gateway, r.dev) for r in got} == {
        ("10.65.2.0/26", vtep_for("node2", "10.65.2.0/26")[0], "vxlan.calico"),
        ("10.65.3.0/26", vtep_for("node3", "10.65.3.0/26")[0], "vxlan.calico")}
    # A node that published its own VTEP keeps it.
    published = [Node("node2", "192.168.100.12/24", vxlan_tunnel_addr="10.65.2.1", vxlan_tunnel_mac="02:00:00:00:00:02")]
    assert with_derived_vteps(published, [pool("vxlan")], BLOCKS)[0].vxlan_tunnel_addr == "10.65.2.1"
