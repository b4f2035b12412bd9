"""The routing calc for IPv6 and dual-stack (pure): routes via the peers' IPv6 addresses,
vxlan-v6.calico's VTEPs, FDB and neighbours, blackholes for own IPv6 blocks, BIRD's IPv6
sessions (checked by BIRD's own parser), ip6tables natOutgoing, the plan's families and
the sysctl driver's IPv6 forwarding."""
import shutil
import subprocess

import pytest

from felix_agent.calc.bird_conf import bird_config, sessions
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.desired import FDBEntry, Hook, Neighbor, Route
from felix_agent.calc.nat import nat6_state
from felix_agent.calc.plan import PlanConfig, Planner
from felix_agent.calc.routes import (local_block_routes, off_subnet_nodes, remote_routes, tunnel_block, vtep_for,
                                     vtep_mac, vxlan_peers, with_derived_vteps, with_own_prefix)
from felix_agent.dataplane.sysctls import SysctlDriver
from felix_agent.model import BlockAffinity, IPPool, Node, Update

N1 = Node("node1", "192.168.100.11/24", ip6="fd00:100::11/64")
N2 = Node("node2", "192.168.100.12/24", ip6="fd00:100::12/64")
N3 = Node("node3", "192.168.100.13/24", ip6="fd00:200::13/64")  # IPv6: another subnet
NODES = [N1, N2, N3]
B4 = [BlockAffinity(f"10.65.{i}.0/26", f"node{i}") for i in (1, 2, 3)]
B6 = [BlockAffinity(f"fd00:10:65::{i}00/122", f"node{i}") for i in (1, 2, 3)]


def pools(mode, **kw):
    return [IPPool("p4", "10.65.0.0/16", mode=mode, **kw), IPPool("p6", "fd00:10:65::/112", 122, mode=mode, **kw)]


def test_direct_routes_each_family_via_the_peers_address_of_that_family():
    got = remote_routes(NODES, pools("direct"), B4 + B6, "node1")
    assert got == {Route("10.65.2.0/26", dev="eth0", gateway="192.168.100.12", onlink=True),
                   Route("10.65.3.0/26", dev="eth0", gateway="192.168.100.13", onlink=True),
                   Route("fd00:10:65::200/122", dev="eth0", gateway="fd00:100::12", onlink=True)}
    # node3 is on my IPv4 subnet but not my IPv6 one: its IPv6 block is unreachable, said so
    assert off_subnet_nodes(NODES, pools("direct"), B4 + B6, "node1", "direct") == ("node3",)


def test_a_peer_without_an_ipv6_address_gets_no_ipv6_route():
    got = remote_routes([N1, Node("node2", "192.168.100.12/24")], pools("direct"), B4 + B6, "node1")
    assert got == {Route("10.65.2.0/26", dev="eth0", gateway="192.168.100.12", onlink=True)}


def test_vxlan_v6_routes_peers_and_vteps():
    nodes = with_derived_vteps(NODES, pools("vxlan"), B4 + B6)
    n2 = nodes[1]
    assert n2.vtep_of(6) == ("fd00:10:65::200", vtep_mac("node2", 6)) and vtep_mac("node2", 6) != vtep_mac("node2")
    assert n2.vtep_of(4) == vtep_for("node2", "10.65.2.0/26")
    got = remote_routes(nodes, pools("vxlan"), B4 + B6, "node1")
    assert Route("fd00:10:65::200/122", dev="vxlan-v6.calico", gateway="fd00:10:65::200", onlink=True) in got
    assert Route("10.65.2.0/26", dev="vxlan.calico", gateway=n2.vxlan_tunnel_addr, onlink=True) in got
    fdb, neigh = vxlan_peers(nodes, pools("vxlan"), "node1", 6)
    assert FDBEntry(vtep_mac("node2", 6), "fd00:100::12", "vxlan-v6.calico") in fdb
    assert Neighbor("fd00:10:65::200", vtep_mac("node2", 6), "vxlan-v6.calico") in neigh
    assert tunnel_block(nodes, pools("vxlan"), B4 + B6, "node1", "vxlan", version=6) == "fd00:10:65::100/122"
    # no IPv6 vxlan pool: no IPv6 peers
    assert vxlan_peers(nodes, pools("vxlan")[:1], "node1", 6) == (frozenset(), frozenset())


def test_blackholes_for_own_blocks_of_both_families():
    assert local_block_routes(NODES, pools("bgp"), B4 + B6, "node1") == {
        Route("10.65.1.0/26", type="blackhole"), Route("fd00:10:65::100/122", type="blackhole")}


def test_own_ipv6_prefix_from_the_uplink():
    nodes = {"node1": Node("node1", "192.168.100.11/24", ip6="fd00:100::11/128")}
    assert with_own_prefix(nodes, "node1", "", "fd00:100::11/64")["node1"].ip6 == "fd00:100::11/64"


def test_nat6_masquerades_only_natoutgoing_ipv6_pools_to_the_outside():
    chains, hooks = nat6_state([IPPool("p4", "10.65.0.0/16", nat_outgoing=True),
                                IPPool("p6", "fd00:10:65::/112", 122, nat_outgoing=True),
                                IPPool("other6", "fd00:99::/64", 122)], NODES)
    assert hooks == (Hook("nat", "POSTROUTING", "cali-POSTROUTING"),)
    assert chains["nat"]["cali-POSTROUTING"] == ("-j cali-nat-outgoing",)
    assert chains["nat"]["cali-nat-outgoing"] == (
        "-d fd00:99::/64 -j RETURN", "-d fd00:10:65::/112 -j RETURN",
        "-d fd00:100::11/128 -j RETURN", "-d fd00:100::12/128 -j RETURN", "-d fd00:200::13/128 -j RETURN",
        "-s fd00:10:65::/112 -j MASQUERADE")
    assert nat6_state([IPPool("p6", "fd00:10:65::/112", 122)], NODES)[0]["nat"]["cali-nat-outgoing"] == ()


def test_bgp_ipv6_sessions_between_node_ipv6_addresses():
    s6 = sessions(NODES, [], "node1", version=6)
    assert [(s.name, s.peer_ip) for s in s6] == [("Mesh_fd00_100__12", "fd00:100::12"),
                                                 ("Mesh_fd00_200__13", "fd00:200::13")]
    text = bird_config(NODES, [], pools("bgp"), B4 + B6, "node1")
    assert "router id 192.168.100.11;" in text
    assert "route fd00:10:65::100/122 blackhole;" in text and "route 10.65.1.0/26 blackhole;" in text
    assert "local fd00:100::11 port 179 as 64512;" in text
    assert "protocol bgp Mesh_fd00_100__12 from tortie_peer6 {\n  neighbor fd00:100::12 port 179" in text
    assert "if gw ~ fd00:100::/64 then accept;" in text
    # no IPv6 pool: no IPv6 part at all
    assert "ipv6" not in bird_config(NODES, [], pools("bgp")[:1], B4, "node1")


@pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 is not installed")
def test_dual_stack_config_parses(tmp_path):
    path = tmp_path / "bird.conf"
    path.write_text(bird_config(NODES, [], pools("bgp"), B4 + B6, "node1"))
    p = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_plan_carries_families_vxlan6_and_the_nat6_chain():
    c = Cluster()
    for n in NODES:
        c.apply(Update("Node", n.name, n))
    for p in pools("vxlan", nat_outgoing=True):
        c.apply(Update("IPPool", p.name, p))
    for b in B4 + B6:
        c.apply(Update("BlockAffinity", b.cidr, b))
    plan = Planner(PlanConfig(node="node1", uplink="eth0", bird=False)).plan(c)
    assert plan.families == (4, 6)
    assert plan.vxlan6 is not None and plan.vxlan6.addr == "fd00:10:65::100" and plan.vxlan6.version == 6
    assert plan.vxlan.addr == "10.65.1.0"
    assert "-s fd00:10:65::/112 -j MASQUERADE" in plan.state.chains6["nat"]["cali-nat-outgoing"]
    assert "raw" in plan.state.chains6  # the policy part's ip6tables chains stay
    assert Hook("nat", "POSTROUTING", "cali-POSTROUTING") in plan.state.hooks6


def test_sysctls_forward_ipv6_only_with_an_ipv6_pool(tmp_path):
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/ipv6/conf/all").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text("1\n")
    (tmp_path / "net/ipv6/conf/all/forwarding").write_text("0\n")
    d = SysctlDriver(proc_sys=str(tmp_path))

    class P:
        families = (4,)
    d.set_desired(d.wanted(P))
    assert not d.apply(full=True).changes
    assert (tmp_path / "net/ipv6/conf/all/forwarding").read_text().strip() == "0"
    P.families = (4, 6)
    d.set_desired(d.wanted(P))
    assert d.apply(full=True).changes == {"forwarding6": "net.ipv6.conf.all.forwarding=1"}
    assert (tmp_path / "net/ipv6/conf/all/forwarding").read_text().strip() == "1"
    (tmp_path / "net/ipv6/conf/all/forwarding").write_text("0\n")
    off = SysctlDriver(ensure_forwarding=False, proc_sys=str(tmp_path))
    off.set_desired((4, 6))
    assert "net.ipv6.conf.all.forwarding is 0" in off.apply(full=True).problems["forwarding6"]


def test_bgp_peers_join_the_sessions_of_their_family():
    from felix_agent.model import BGPPeer
    peers = [BGPPeer("tor4", "192.168.100.1", 65000), BGPPeer("tor6", "fd00:100::1", 65000)]
    s4 = sessions(NODES, peers, "node1")
    s6 = sessions(NODES, peers, "node1", version=6)
    assert [s.name for s in s4 if s.name.startswith("Peer")] == ["Peer_tor4"]
    assert [(s.name, s.peer_ip) for s in s6 if s.name.startswith("Peer")] == [("Peer_tor6", "fd00:100::1")]
    with pytest.raises(ValueError, match="no IPv6 address"):
        sessions([Node("node1", "192.168.100.11/24")], [], "node1", version=6)


@pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 is not installed")
def test_ipv6_only_node_renders_ipv6_only_with_a_hashed_router_id(tmp_path):
    nodes = [Node(f"node{i}", ip6=f"fd00:100::1{i}/64") for i in (1, 2)]
    text = bird_config(nodes, [], pools("bgp")[1:], B6[:2], "node1")
    rid = text.split("router id ")[1].split(";")[0]
    assert rid.count(".") == 3 and rid == bird_config(nodes, [], pools("bgp")[1:], B6[:2], "node1").split(
        "router id ")[1].split(";")[0]  # stable across renders
    assert "ipv4" not in text and "protocol bgp Mesh_fd00_100__12 from tortie_peer6" in text
    path = tmp_path / "bird.conf"
    path.write_text(text)
    p = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
