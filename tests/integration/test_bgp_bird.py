"""Real BIRD in the netns lab: full mesh, route reflector, withdrawal, pod traffic over
BGP-learnt routes, and the BirdDaemon lifecycle (start, unchanged, reload, bad config,
restart after death)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from felix_agent.dataplane.bird import BirdError
from felix_agent.calc.bird_conf import bird_config
from felix_agent.model import BlockAffinity, IPPool, Node
from tests.integration.test_routing_support import birds, wait_for, wire_pod  # noqa: F401 (fixture)
from tests.lab import tcp_probe
from tests.integration.test_lab import start_tcp_server

pytestmark = pytest.mark.root

POOLS = [IPPool("default", "10.65.0.0/16", mode="bgp")]


def model_of(lab, reflectors=()):
    nodes = [Node(n.name, n.cidr, route_reflector_cluster_id="244.0.0.1" if n.name in reflectors else "")
             for n in lab.nodes]
    blocks = [BlockAffinity(f"10.65.{i}.0/26", n.name, "default") for i, n in enumerate(lab.nodes, 1)]
    return nodes, blocks


def start_all(lab, birds, nodes, blocks):
    for n in lab.nodes:
        assert birds.for_node(n.ns).ensure(bird_config(nodes, [], POOLS, blocks, n.name)) == "started"


def bird_routes(lab, ns) -> set[str]:
    out = lab.exec(ns, "ip", "-4", "route", "show", "proto", "bird").stdout
    return {" ".join(line.split()) for line in out.splitlines() if line.strip()}


def test_mesh_three_nodes_routes_and_pod_traffic(make_lab, birds):
    lab = make_lab(3)
    nodes, blocks = model_of(lab)
    start_all(lab, birds, nodes, blocks)
    for n in lab.nodes:
        d = birds.for_node(n.ns)
        wait_for(lambda: len(d.established_peers()) == 2, what=f"{n.name} sessions")
        assert sorted(d.established_peers()) == sorted(
            f"Mesh_{o.ip.replace('.', '_')}" for o in lab.nodes if o is not n)
    # every node learns exactly the others' blocks, via their addresses, as proto bird
    for i, n in enumerate(lab.nodes, 1):
        want = {f"10.65.{j}.0/26 via {o.ip} dev eth0 metric 32"
                for j, o in enumerate(lab.nodes, 1) if j != i}
        got = wait_for(lambda: bird_routes(lab, n.ns) if len(bird_routes(lab, n.ns)) == 2 else None,
                       what=f"{n.name} bird routes")
        assert got == want, got
        # the own block's blackhole is announced, never put into the kernel
        assert lab.exec(n.ns, "ip", "route", "show", f"10.65.{i}.0/26").stdout.strip() == ""
    # pods across nodes, over nothing but those routes
    pods = [wire_pod(lab, n.ns, f"bgp{i}", f"10.65.{i}.2") for i, n in enumerate(lab.nodes, 1)]
    start_tcp_server(lab, pods[2].ns, 8080)
    assert lab.ping(pods[0].ns, pods[1].ip)
    assert lab.ping(pods[1].ns, pods[2].ip)
    assert tcp_probe(lab, pods[0].ns, pods[2].ip, 8080)
    # an address in no block has no route (the default route leads nowhere in the lab)
    assert not lab.ping(pods[0].ns, "10.65.200.2", timeout=1)


def test_route_reflector_one_session_and_withdrawal(make_lab, birds):
    lab = make_lab(4)
    nodes, blocks = model_of(lab, reflectors=("node1",))
    start_all(lab, birds, nodes, blocks)
    rr = birds.for_node(lab.nodes[0].ns)
    wait_for(lambda: len(rr.established_peers()) == 3, what="reflector sessions")
    for n in lab.nodes[1:]:
        d = birds.for_node(n.ns)
        wait_for(lambda: d.established_peers(), what=f"{n.name} session")
        bgp = [p for p in d.protocols() if p["proto"] == "BGP"]
        assert [p["name"] for p in bgp] == ["Node_192_168_100_11"]  # exactly one session
        assert d.established_peers() == ["Node_192_168_100_11"]
    # routes still propagate between clients, with the originator as next hop
    n3 = lab.nodes[2]
    want = {"10.65.1.0/26 via 192.168.100.11 dev eth0 metric 32",
            "10.65.2.0/26 via 192.168.100.12 dev eth0 metric 32",
            "10.65.4.0/26 via 192.168.100.14 dev eth0 metric 32"}
    assert wait_for(lambda: bird_routes(lab, n3.ns) == want or None, what="routes on node3")
    pods = [wire_pod(lab, lab.nodes[i].ns, f"rr{i}", f"10.65.{i + 1}.2") for i in (1, 3)]
    assert lab.ping(pods[0].ns, pods[1].ip)
    # stopping a client's BIRD withdraws its block everywhere else
    birds.for_node(lab.nodes[3].ns).stop()
    for n in lab.nodes[:3]:
        wait_for(lambda: not any(r.startswith("10.65.4.0/26") for r in bird_routes(lab, n.ns)),
                 what=f"withdrawal on {n.name}")
    assert "10.65.2.0/26 via 192.168.100.12 dev eth0 metric 32" in bird_routes(lab, n3.ns)
    assert not lab.ping(pods[0].ns, pods[1].ip, timeout=1)


def test_daemon_lifecycle(make_lab, birds):
    lab = make_lab(2)
    nodes, blocks = model_of(lab)
    n1, n2 = lab.nodes
    d1, d2 = birds.for_node(n1.ns), birds.for_node(n2.ns)
    conf1 = bird_config(nodes, [], POOLS, blocks, "node1")
    assert d1.ensure(conf1) == "started"
    assert d1.ensure(conf1) == "unchanged"
    d2.ensure(bird_config(nodes, [], POOLS, blocks, "node2"))
    wait_for(lambda: d1.established_peers(), what="session")
    # bird really runs inside the node namespace
    assert os.stat(f"/proc/{d1.pid()}/ns/net").st_ino == os.stat(f"/var/run/netns/{n1.ns}").st_ino
    # a changed model reloads in place: a new block appears at the peer, same pid
    pid = d1.pid()
    blocks2 = blocks + [BlockAffinity("10.65.77.0/26", "node1")]
    assert d1.ensure(bird_config(nodes, [], POOLS, blocks2, "node1")) == "reloaded"
    assert d1.pid() == pid
    wait_for(lambda: any(r.startswith("10.65.77.0/26 via 192.168.100.11") for r in bird_routes(lab, n2.ns)),
             what="new block at node2")
    # a bad config is refused with BIRD's reason; the running one stays
    good = d1.current_config()
    with pytest.raises(BirdError, match="BIRD rejected the config"):
        d1.ensure(good + "protocol bgp broken {\n")
    assert d1.current_config() == good and d1.pid() == pid
    # bird killed behind our back: ensure() starts it again
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not d1.running(), what="bird to die")
    assert d1.ensure(good) == "started"
    assert d1.pid() != pid
    wait_for(lambda: d1.established_peers(), what="session after restart")


def test_per_node_as_ebgp(make_lab, birds):
    lab = make_lab(3)
    nodes = [Node(n.name, n.cidr, as_number=65001 + i) for i, n in enumerate(lab.nodes)]
    _, blocks = model_of(lab)
    start_all(lab, birds, nodes, blocks)
    for n in lab.nodes:
        d = birds.for_node(n.ns)
        wait_for(lambda: len(d.established_peers()) == 2, what=f"{n.name} eBGP sessions")
    n1 = lab.nodes[0]
    want = {"10.65.2.0/26 via 192.168.100.12 dev eth0 metric 32",
            "10.65.3.0/26 via 192.168.100.13 dev eth0 metric 32"}
    assert wait_for(lambda: bird_routes(lab, n1.ns) == want or None, what="eBGP routes on node1")
    # each node exports only its own blocks: node1 hears 10.65.3.0/26 from node3 alone
    out = birds.for_node(n1.ns).birdc("show", "route", "all", "10.65.3.0/26")
    assert "BGP.as_path: 65003" in out and "65002 65003" not in out
    pods = [wire_pod(lab, n.ns, f"as{i}", f"10.65.{i}.2") for i, n in enumerate(lab.nodes, 1)]
    assert lab.ping(pods[0].ns, pods[2].ip)


def test_plain_bgp_across_a_router_is_not_programmed(make_lab, birds):
    """Sessions come up across the router (iBGP is multihop), but a next hop behind it is
    not usable without a tunnel, so BIRD keeps the route out of the kernel instead of
    installing something broken."""
    lab = make_lab(2, two_subnets=True)
    nodes, blocks = model_of(lab)
    start_all(lab, birds, nodes, blocks)
    for n in lab.nodes:
        d = birds.for_node(n.ns)
        wait_for(lambda: d.established_peers(), what=f"{n.name} session across the router")
    n1 = lab.nodes[0]
    out = wait_for(lambda: (o := birds.for_node(n1.ns).birdc("show", "route", "10.65.2.0/26"))
                   and "10.65.2.0/26" in o and o, what="route learnt by BIRD")
    assert "192.168.200.12" in out
    assert bird_routes(lab, n1.ns) == set()


def test_killed_bird_restarts_without_withdrawing_a_route(make_lab, birds, tmp_path):
    """BIRD killed the way a replaced pod kills it (SIGKILL: no NOTIFICATION) and started
    again: graceful restart keeps both directions' routes in both kernels throughout."""
    lab = make_lab(2)
    nodes, blocks = model_of(lab)
    n1, n2 = lab.nodes
    d1, d2 = birds.for_node(n1.ns), birds.for_node(n2.ns)
    conf1 = bird_config(nodes, [], POOLS, blocks, "node1")
    assert not d1.kernel_has_bird_routes()  # a fresh node: a plain start
    d1.ensure(conf1)
    d2.ensure(bird_config(nodes, [], POOLS, blocks, "node2"))
    to_n1 = "10.65.1.0/26 via 192.168.100.11 dev eth0 metric 32"
    to_n2 = "10.65.2.0/26 via 192.168.100.12 dev eth0 metric 32"
    wait_for(lambda: to_n1 in bird_routes(lab, n2.ns) and to_n2 in bird_routes(lab, n1.ns), what="routes")
    # every route change in both kernels from here on
    logs = {n.ns: tmp_path / f"{n.name}.routes" for n in lab.nodes}
    monitors = [lab.popen(ns, ["ip", "-4", "monitor", "route"], stdout=open(path, "w"), stderr=subprocess.STDOUT)
                for ns, path in logs.items()]
    pid = d1.pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not d1.running(), what="bird to die")
    wait_for(lambda: "Mesh_192_168_100_11" not in d2.established_peers(), what="node2 to see the session go")
    assert to_n1 in bird_routes(lab, n2.ns)  # the peer keeps the dead BIRD's route (stale)
    assert d1.kernel_has_bird_routes()
    assert d1.ensure(conf1) == "started"  # with -R: the kernel holds its routes
    assert b"-R" in open(f"/proc/{d1.pid()}/cmdline", "rb").read().split(b"\0")
    wait_for(lambda: "Mesh_192_168_100_11" in d2.established_peers(), what="the session back")
    # recovery ends once node2 sent End-of-RIB; then node1 prunes what is stale (nothing is)
    wait_for(lambda: not d1.recovering(), what="recovery to end")
    time.sleep(1)  # one more exchange of updates, had anything been withdrawn
    for m in monitors:
        m.terminate()
        m.wait(5)
    for ns, path in logs.items():
        changes = path.read_text()
        assert "Deleted" not in changes, (ns, changes)
    assert to_n1 in bird_routes(lab, n2.ns) and to_n2 in bird_routes(lab, n1.ns)
    # with its peer gone too, a restarted BIRD stays in recovery (the agent is not ready,
    # see health.py) and the kernel keeps the routes meanwhile
    os.kill(d2.pid(), signal.SIGKILL)
    os.kill(d1.pid(), signal.SIGKILL)
    wait_for(lambda: not d1.running() and not d2.running(), what="both birds to die")
    assert d1.ensure(conf1) == "started"
    assert d1.recovering()
    assert to_n2 in bird_routes(lab, n1.ns)
