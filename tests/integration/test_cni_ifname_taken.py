"""A runtime's ADD for a SECOND container into a netns whose CNI_IFNAME is already wired for
the first: the built binary (dist/tortie) refuses it with a CNI error naming the interface,
changes nothing, and the first pod keeps its interface, address, routes, IPAM reservation
and traffic; CHECK, DEL and GC of both containers then do the right thing. Both ways the
binary works: the agent's IPAM (ipam.type tortie, a real tortie-agent) and host-local
without an agent. The second container names the same pod (its host veth name collides
with the first's) or another pod."""
from __future__ import annotations

import json
import subprocess

import pytest

from podnet.errors import DATAPLANE_FAILURE
from tests.lab.cni_runtime import invoke
from tests.lab.cnibin import MODULE

from tests.integration.test_cni_helpers import make_net, pod_ip, tortie_binary  # noqa: F401 (fixture)

pytestmark = pytest.mark.root


def wiring(lab, node_ns: str, pod_ns: str) -> dict:
    """What the kernel holds for the pod's eth0: its link, addresses and routes in the pod,
    and the node's cali links and host routes."""
    return {"pod_link": lab.exec(pod_ns, "ip", "-o", "link", "show", "eth0").stdout.split("<")[0],
            "pod_addrs": lab.exec(pod_ns, "ip", "-o", "addr", "show", "dev", "eth0").stdout,
            "pod_routes": lab.exec(pod_ns, "ip", "route").stdout,
            "cali": sorted(ln.split(":")[1].strip() for ln in lab.exec(node_ns, "ip", "-o", "link").stdout.splitlines()
                           if "cali" in ln),
            "host_routes": sorted(r for r in lab.exec(node_ns, "ip", "route").stdout.splitlines() if "cali" in r)}


def refused(r, ifname: str = "eth0") -> dict:
    assert r.returncode != 0, r.stdout
    err = json.loads(r.stdout)
    assert err["code"] == DATAPLANE_FAILURE, err
    assert f"interface {ifname} already exists" in err["msg"] and "nothing was changed" in err["msg"], err
    return err


@pytest.mark.parametrize("same_pod", [True, False], ids=["same-pod", "other-pod"])
def test_host_local_second_container_is_refused_and_first_keeps_working(make_lab, tmp_path, tortie_binary,
                                                                          same_pod):
    lab = make_lab(1)
    node = lab.nodes[0]
    pod_ns = lab.add_pod_ns("first")
    net = make_net(lab, tmp_path, [tortie_binary], version="1.1.0")
    first, res = net.add(pod_ns, "first")
    ip = pod_ip(res)
    second = net.attachment(pod_ns, "first" if same_pod else "second", container_id="c-second")
    before = wiring(lab, node.ns, pod_ns)
    log_before = open(net.log_file).read()

    err = refused(net.run("ADD", second))
    assert first.container_id in err["msg"]  # names the owner
    assert wiring(lab, node.ns, pod_ns) == before
    assert net.allocated() == [ip] and net.records() == [f"{first.container_id}@eth0.json"]
    assert lab.ping(node.ns, ip) and lab.ping(pod_ns, node.ip)
    assert "ADD c-second/eth0 -> error 100" in open(net.log_file).read()[len(log_before):]

    # A repeated ADD of the first container itself is not refused (it goes on as before).
    again = net.run("ADD", first)
    assert again.ok or "already exists" not in again.stdout, again.stdout
    assert net.records() == [f"{first.container_id}@eth0.json"] and lab.ping(node.ns, ip)

    # CHECK: the first passes; the second (it has no address of its own) fails.
    assert net.run("CHECK", first, net.conf(prevResult=res)).ok
    assert net.run("CHECK", second, net.conf(prevResult=res)).returncode != 0
    # GC that keeps both changes nothing; the second's DEL succeeds and touches nothing.
    kept = wiring(lab, node.ns, pod_ns)
    both = [{"containerID": a.container_id, "ifname": "eth0"} for a in (first, second)]
    assert net.run("GC", None, net.conf(**{"cni.dev/valid-attachments": both})).ok
    for _ in range(2):
        r = net.run("DEL", second)
        assert r.ok, r.stdout
    assert wiring(lab, node.ns, pod_ns) == kept and net.allocated() == [ip]
    assert lab.ping(node.ns, ip) and net.run("CHECK", first, net.conf(prevResult=res)).ok
    # GC that keeps only the second removes the first: veth, route, address, record.
    only_second = [{"containerID": second.container_id, "ifname": "eth0"}]
    assert net.run("GC", None, net.conf(**{"cni.dev/valid-attachments": only_second})).ok
    net.assert_nothing_left()
    assert net.run("CHECK", first, net.conf(prevResult=res)).returncode != 0
    assert net.run("DEL", first).ok
    net.assert_nothing_left()


@pytest.mark.parametrize("same_pod", [True, False], ids=["same-pod", "other-pod"])
def test_agent_second_container_is_refused_and_first_keeps_working(make_cluster, same_pod):
    c = make_cluster(1)
    node = c.lab.nodes[0]
    first = c.add_pod("default", "first", node, serve=["tcp:80"])
    peer = c.add_pod("default", "peer", node)
    second_pod = "first" if same_pod else "second"
    netns = f"/var/run/netns/{first.ns}"

    def allocations() -> dict[str, str]:
        return {a["container_id"]: a["ip"] for a in c.status(node)["ipam"]["allocation_list"]}

    def conf(**over) -> dict:
        return {**c.cni_conf(node), "cniVersion": "1.1.0", **over}

    before, allocs = wiring(c.lab, node.ns, first.ns), allocations()
    r = c.cni_run(node, "ADD", "c-second", netns, "default", second_pod)
    err = refused(r)
    assert first.container_id in err["msg"]
    assert wiring(c.lab, node.ns, first.ns) == before
    assert allocations() == allocs and "c-second" not in allocs
    assert c.probe(peer, first.ip, 80)

    # The first container's repeated ADD still goes through, with its own address.
    again = c.cni_run(node, "ADD", first.container_id, netns, "default", "first")
    assert again.returncode == 0, again.stdout
    assert json.loads(again.stdout)["ips"][0]["address"] == f"{first.ip}/32"
    assert c.probe(peer, first.ip, 80)

    prev, kept = json.loads(again.stdout), wiring(c.lab, node.ns, first.ns)
    ok = c.cni_run(node, "CHECK", first.container_id, netns, "default", "first", conf=conf(prevResult=prev))
    assert ok.returncode == 0, ok.stdout
    bad = c.cni_run(node, "CHECK", "c-second", netns, "default", second_pod, conf=conf(prevResult=prev))
    assert bad.returncode != 0 and "no address is allocated to c-second/eth0" in bad.stdout
    valid = [{"containerID": x, "ifname": "eth0"} for x in (first.container_id, peer.container_id, "c-second")]
    assert invoke(c.cni, "GC", conf(**{"cni.dev/valid-attachments": valid}), None, node.ns).ok
    for _ in range(2):
        d = c.cni_run(node, "DEL", "c-second", netns, "default", second_pod)
        assert d.returncode == 0, d.stdout
    assert wiring(c.lab, node.ns, first.ns) == kept
    assert allocations() == allocs and c.probe(peer, first.ip, 80)
    # GC without the first: its veth, route and address go; the peer stays.
    valid = [{"containerID": peer.container_id, "ifname": "eth0"}]
    assert invoke(c.cni, "GC", conf(**{"cni.dev/valid-attachments": valid}), None, node.ns).ok
    assert set(allocations()) == {peer.container_id}
    assert c.lab.exec(first.ns, "ip", "link", "show", "eth0", check=False).returncode != 0
    assert not [r for r in c.lab.exec(node.ns, "ip", "route").stdout.splitlines() if r.startswith(first.ip + " ")]
    assert c.cni_run(node, "DEL", first.container_id, netns, "default", "first").returncode == 0


@pytest.mark.parametrize("how", ["binary", "module"])
def test_help_prints_usage(tortie_binary, how):
    argv = [tortie_binary] if how == "binary" else list(MODULE)
    for flag in ("--help", "-h"):
        p = subprocess.run(argv + [flag], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and p.stdout.startswith("usage: tortie"), p.stdout + p.stderr
        assert "CNI_COMMAND" in p.stdout and '"code"' not in p.stdout
