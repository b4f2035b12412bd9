"""VXLAN in the netns lab: the VxlanDevice driver (create, idempotence, drift repair, bad
input), pods across three nodes through vxlan.calico, and crossSubnet across a router:
plain next hops fail there, VXLAN works and is used only between subnets."""
from __future__ import annotations

import pytest

from felix_agent.calc.desired import FDBEntry, Neighbor
from felix_agent.calc.routes import local_block_routes, remote_routes, vtep_for, vxlan_peers
from felix_agent.dataplane.routes import RouteDriver
from felix_agent.dataplane.tunnels import TunnelError, VxlanDevice
from felix_agent.model import BlockAffinity, IPPool, Node
from tests.integration.test_lab import start_tcp_server
from tests.integration.test_routing_support import program_routes, wire_pod
from tests.lab import tcp_probe

pytestmark = pytest.mark.root


def model(lab, cross_subnet=False):
    pools = [IPPool("vx", "10.65.0.0/16", mode="vxlan", cross_subnet=cross_subnet)]
    blocks = [BlockAffinity(f"10.65.{i}.0/26", n.name, "vx") for i, n in enumerate(lab.nodes, 1)]
    nodes = []
    for i, n in enumerate(lab.nodes, 1):
        addr, mac = vtep_for(n.name, f"10.65.{i}.0/26")  # what each agent publishes
        nodes.append(Node(n.name, n.cidr, vxlan_tunnel_addr=addr, vxlan_tunnel_mac=mac))
    return nodes, pools, blocks


def bring_up(lab, nodes, pools, blocks, route_driver=False):
    """What each node's agent does for vxlan: device, FDB/neighbours, routes (through the
    RouteDriver, or `ip route` to keep a test independent of it)."""
    devs = {}
    for n, me in zip(lab.nodes, nodes):
        dev = VxlanDevice(netns=n.ns)
        fdb, neigh = vxlan_peers(nodes, pools, n.name)
        dev.set_desired(me.vxlan_tunnel_addr, me.vxlan_tunnel_mac, "eth0", fdb=fdb, neighbors=neigh)
        assert dev.apply()  # created
        routes = remote_routes(nodes, pools, blocks, n.name) | local_block_routes(nodes, pools, blocks, n.name)
        if route_driver:
            drv = RouteDriver(netns=n.ns)
            drv.set_desired(routes)
            ch = drv.apply()
            assert not ch.failed and not ch.conflicts and len(ch.added) == len(routes)
        else:
            program_routes(lab, n.ns, routes)
        devs[n.name] = dev
    return devs


def counters(lab, ns) -> tuple[int, int]:
    base = "/sys/class/net/vxlan.calico/statistics/"
    out = lab.exec(ns, "cat", base + "tx_packets", base + "rx_packets").stdout.split()
    return int(out[0]), int(out[1])


def test_device_create_idempotent_drift_and_stale(make_lab):
    lab = make_lab(1)
    ns = lab.nodes[0].ns
    dev = VxlanDevice(netns=ns)
    addr, mac = vtep_for("node1", "10.65.1.0/26")
    fdb = {FDBEntry("66:00:00:00:00:02", "192.168.100.12"), FDBEntry("66:00:00:00:00:03", "192.168.100.13")}
    neigh = {Neighbor("10.65.2.0", "66:00:00:00:00:02"), Neighbor("10.65.3.0", "66:00:00:00:00:03")}
    dev.set_desired(addr, mac, "eth0", fdb=fdb, neighbors=neigh)
    assert dev.apply()
    link = lab.exec(ns, "ip", "-d", "link", "show", "vxlan.calico").stdout
    for want in ("vxlan id 4096", "local 192.168.100.11", "dev eth0", "dstport 4789", "nolearning",
                 "mtu 1450", mac):
        assert want in link, want
    assert "UP" in link.split(">")[0]
    assert f"inet {addr}/32" in lab.exec(ns, "ip", "-4", "addr", "show", "vxlan.calico").stdout
    fdb_out = lab.exec(ns, "bridge", "fdb", "show", "dev", "vxlan.calico").stdout
    assert "66:00:00:00:00:02 dst 192.168.100.12 self permanent" in fdb_out
    nb = lab.exec(ns, "ip", "neigh", "show", "dev", "vxlan.calico").stdout
    assert "10.65.3.0 lladdr 66:00:00:00:00:03 PERMANENT" in nb
    assert dev.apply() == []  # nothing to do the second time

    # drift: someone deletes an entry, changes the MTU, adds an address
    lab.exec(ns, "ip", "neigh", "del", "10.65.2.0", "dev", "vxlan.calico")
    lab.exec(ns, "bridge", "fdb", "del", "66:00:00:00:00:03", "dev", "vxlan.calico", "dst", "192.168.100.13")
    lab.exec(ns, "ip", "link", "set", "vxlan.calico", "mtu", "1300")
    lab.exec(ns, "ip", "addr", "add", "10.99.0.1/32", "dev", "vxlan.calico")
    changed = dev.apply()
    assert len(changed) == 4, changed
    assert dev.apply() == []
    assert "mtu 1450" in lab.exec(ns, "ip", "link", "show", "vxlan.calico").stdout
    assert "10.99.0.1" not in lab.exec(ns, "ip", "addr", "show", "vxlan.calico").stdout

    # a node went away: its entries go too
    dev.set_desired(addr, mac, "eth0", fdb={FDBEntry("66:00:00:00:00:02", "192.168.100.12")},
                    neighbors={Neighbor("10.65.2.0", "66:00:00:00:00:02")})
    assert sorted(dev.apply()) == ["fdb -66:00:00:00:00:03 192.168.100.13", "neigh -10.65.3.0"]
    assert "66:00:00:00:00:03" not in lab.exec(ns, "bridge", "fdb", "show", "dev", "vxlan.calico").stdout

    # a device with the wrong VNI is replaced
    lab.exec(ns, "ip", "link", "del", "vxlan.calico")
    lab.exec(ns, "ip", "link", "add", "vxlan.calico", "type", "vxlan", "id", "7", "dstport", "4789", "dev", "eth0")
    assert any("deleted" in c for c in dev.apply())
    assert "vxlan id 4096" in lab.exec(ns, "ip", "-d", "link", "show", "vxlan.calico").stdout


def test_bad_input_changes_nothing(make_lab):
    lab = make_lab(1)
    ns = lab.nodes[0].ns
    dev = VxlanDevice(netns=ns)
    for args, msg in [(("10.65.1.0", "zz:zz", "eth0"), "not a MAC"),
                      (("10.65.1.0", "01:00:00:00:00:01", "eth0"), "multicast"),
                      (("nope", "66:00:00:00:00:01", "eth0"), "not an IP"),
                      (("10.65.1.0", "66:00:00:00:00:01", ""), "not an interface")]:
        with pytest.raises(ValueError, match=msg):
            dev.set_desired(*args)
    with pytest.raises(ValueError, match="FDB entry"):
        dev.set_desired("10.65.1.0", "66:00:00:00:00:01", "eth0", fdb={FDBEntry("66:00:00:00:00:02", "x")})
    with pytest.raises(TunnelError, match="before set_desired"):
        dev.apply()
    dev.set_desired("10.65.1.0", "66:00:00:00:00:01", "eth9")
    with pytest.raises(TunnelError, match="uplink 'eth9' does not exist"):
        dev.apply()
    assert lab.exec(ns, "ip", "link", "show", "vxlan.calico", check=False).returncode != 0


def test_three_nodes_pods_over_vxlan(make_lab):
    lab = make_lab(3)
    nodes, pools, blocks = model(lab)
    bring_up(lab, nodes, pools, blocks, route_driver=True)
    r = lab.exec(lab.nodes[0].ns, "ip", "route", "show", "10.65.2.0/26").stdout
    assert "via 10.65.2.0 dev vxlan.calico proto 80 onlink" in r
    assert "blackhole 10.65.1.0/26" in lab.exec(lab.nodes[0].ns, "ip", "route", "show", "type", "blackhole").stdout
    pods = [wire_pod(lab, n.ns, f"vx{i}", f"10.65.{i}.2") for i, n in enumerate(lab.nodes, 1)]
    start_tcp_server(lab, pods[1].ns, 8080)
    before = counters(lab, lab.nodes[0].ns)
    assert lab.ping(pods[0].ns, pods[1].ip)
    assert lab.ping(pods[2].ns, pods[0].ip)
    assert tcp_probe(lab, pods[0].ns, pods[1].ip, 8080)
    after = counters(lab, lab.nodes[0].ns)
    assert after[0] > before[0] and after[1] > before[1]  # it really went through the tunnel
    # an unused address in a remote block is dropped by that node's blackhole
    assert not lab.ping(pods[0].ns, "10.65.2.50", timeout=1)


def test_cross_subnet_plain_fails_vxlan_only_across(make_lab):
    lab = make_lab(3, two_subnets=True)  # node1, node3 on 192.168.100/24; node2 on 192.168.200/24
    n1, n2, n3 = lab.nodes
    assert n1.subnet == n3.subnet != n2.subnet
    pods = [wire_pod(lab, n.ns, f"cs{i}", f"10.65.{i}.2") for i, n in enumerate(lab.nodes, 1)]

    # Why a plain next hop cannot work across the router: the kernel refuses a gateway
    # that is not on the link, forcing it onlink just ARPs into the wrong segment, and
    # the router (the default route) knows no pod blocks.
    p = lab.exec(n1.ns, "ip", "route", "add", "10.65.2.0/26", "via", n2.ip, "dev", "eth0", check=False)
    assert p.returncode != 0 and "gateway" in p.stderr.lower()
    lab.exec(n1.ns, "ip", "route", "add", "10.65.2.0/26", "via", n2.ip, "dev", "eth0", "onlink")
    lab.exec(n2.ns, "ip", "route", "add", "10.65.1.0/26", "via", n1.ip, "dev", "eth0", "onlink")
    assert not lab.ping(pods[0].ns, pods[1].ip, timeout=1)
    neigh = lab.exec(n1.ns, "ip", "neigh", "show", n2.ip).stdout
    assert "FAILED" in neigh or "INCOMPLETE" in neigh or "lladdr" not in neigh
    lab.exec(n1.ns, "ip", "route", "del", "10.65.2.0/26")
    lab.exec(n2.ns, "ip", "route", "del", "10.65.1.0/26")
    assert not lab.ping(pods[0].ns, pods[1].ip, timeout=1)  # now via the default route
    got = lab.exec(lab.router, "ip", "route", "get", pods[1].ip, check=False)
    assert got.returncode != 0 and "unreachable" in got.stderr.lower()

    # VXLAN crossSubnet: encapsulated between subnets, plain next hop within one
    nodes, pools, blocks = model(lab, cross_subnet=True)
    bring_up(lab, nodes, pools, blocks)
    assert "via 192.168.100.13 dev eth0" in lab.exec(n1.ns, "ip", "route", "show", "10.65.3.0/26").stdout
    assert "dev vxlan.calico" in lab.exec(n1.ns, "ip", "route", "show", "10.65.2.0/26").stdout
    start_tcp_server(lab, pods[1].ns, 8080)
    c0 = counters(lab, n1.ns)
    assert lab.ping(pods[0].ns, pods[2].ip, count=3)  # same subnet
    assert counters(lab, n1.ns) == c0, "same-subnet traffic must not be encapsulated"
    assert lab.ping(pods[0].ns, pods[1].ip, count=3)  # across the router
    assert tcp_probe(lab, pods[0].ns, pods[1].ip, 8080)
    c1 = counters(lab, n1.ns)
    assert c1[0] >= c0[0] + 3 and c1[1] >= c0[1] + 3
