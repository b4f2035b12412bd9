"""Whole tortie-agents in kubernetes-datastore mode, as they run on kind, against
tests/fakes/apiserver.py: a stand-in for kube-apiserver v1.28 that replays real recorded
responses (tests/fixtures/k8s-api; no kube-apiserver can run on these machines). Each agent
reaches it through its node's own loopback (tests/lab/nsproxy.py)."""
import json
import os
import subprocess
import sys

import pytest

from tests.fakes.apiserver import FakeAPIServer
from tests.lab.cluster import LabCluster, wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def api():
    server = FakeAPIServer().start()
    yield server
    server.stop()


def start_agent(lab, node, api, tmp_path, node_name: str, *extra: str) -> dict:
    """A tortie-agent on `node` with the kubernetes datastore; returns its CNI config."""
    lab.forward_loopback(node.ns, api.port, api.port)
    kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
    d = tmp_path / node_name
    d.mkdir()
    log = open(d / "agent.log", "wb")
    lab.popen(node.ns, [os.path.join(os.path.dirname(sys.executable), "tortie-agent"),
                        "--datastore", "kubernetes", "--kubeconfig", kubeconfig, "--node-name", node_name,
                        "--default-pool", "10.244.0.0/16", "--socket-path", str(d / "agent.sock"),
                        "--state-dir", str(d / "state"), "--run-dir", str(d / "run"), "--http-port", "9099", *extra],
              stdout=log, stderr=log)
    return {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
            "agent_socket": str(d / "agent.sock"), "log_file_path": str(d / "cni.log"), "ipam": {"type": "tortie"}}


def wait_ready(c: LabCluster, node) -> dict:
    return wait_for(lambda: (s := c.http(node, "/status"))[0] == 200 and json.loads(s[1])["ready"]
                    and json.loads(s[1]), timeout=60, what=f"the agent on {node.name} ready (kubernetes datastore)")


def test_agent_on_the_kubernetes_datastore_wires_a_recorded_pod_under_its_policies(make_lab, api, tmp_path):
    lab = make_lab(1)
    node = lab.nodes[0]
    c = LabCluster(lab, None, str(tmp_path))  # its HTTP and CNI helpers; no etcd in this mode
    # The recordings' only node is "vm" with spec.podCIDR 10.244.0.0/24.
    conf = start_agent(lab, node, api, tmp_path, "vm")
    status = wait_ready(c, node)
    assert status["datastore"] == "kubernetes" and status["in_sync"]
    assert [b["cidr"] for b in status["ipam"]["blocks"]] == ["10.244.0.0/24"]

    # CNI ADD of the recorded pod x/a (labels pod=a), through the real binary and the agent.
    pod_ns = lab.add_pod_ns("x-a")
    p = c.cni_run(node, "ADD", "cid-x-a", f"/var/run/netns/{pod_ns}", "x", "a", conf=conf)
    assert p.returncode == 0, p.stdout + p.stderr
    ip = json.loads(p.stdout)["ips"][0]["address"]
    assert ip.startswith("10.244.0.") and ip.endswith("/32")

    # The recorded namespace x has default-deny ingress and egress policies selecting every
    # pod: their chains must exist when ADD returns, and x/a's chains must jump to them.
    save = lab.exec(node.ns, "iptables-save", "-t", "filter").stdout
    assert any(l.startswith((":cali-pi-", ":cali-po-")) for l in save.splitlines()), save
    iface = json.loads(p.stdout)["interfaces"][0]["name"]
    tw = [l for l in save.splitlines() if l.startswith(f"-A cali-tw-{iface} ")]
    assert any("-j cali-pi-" in l for l in tw), tw
    st = json.loads(c.http(node, "/status")[1])
    assert [(e["namespace"], e["pod"]) for e in st["endpoints"]] == [("x", "a")]
    p = c.cni_run(node, "DEL", "cid-x-a", f"/var/run/netns/{pod_ns}", "x", "a", conf=conf)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "cali" not in subprocess.run(["ip", "-n", node.ns, "-o", "link"], capture_output=True, text=True).stdout


def test_vxlan_between_two_nodes_without_published_vteps(make_lab, api, tmp_path):
    """Read-only RBAC: agents cannot publish VTEPs on their Nodes, so each derives its
    peers' from their podCIDRs and names; pods on two nodes talk over vxlan.calico."""
    lab = make_lab(2)
    c = LabCluster(lab, None, str(tmp_path))
    for i, n in enumerate(lab.nodes, 1):
        api.upsert("nodes", {"metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
                             "spec": {"podCIDR": f"10.244.{i}.0/24", "podCIDRs": [f"10.244.{i}.0/24"]},
                             "status": {"addresses": [{"type": "InternalIP", "address": n.ip}]}})
    confs = [start_agent(lab, n, api, tmp_path, n.name, "--default-pool-mode", "vxlan") for n in lab.nodes]
    for n in lab.nodes:
        wait_ready(c, n)
    ips = []
    for i, (n, conf) in enumerate(zip(lab.nodes, confs)):
        pod_ns = lab.add_pod_ns(f"vx{i}")
        p = c.cni_run(n, "ADD", f"cid-vx{i}", f"/var/run/netns/{pod_ns}", "default", f"vx{i}", conf=conf)
        assert p.returncode == 0, p.stdout + p.stderr
        ips.append((pod_ns, json.loads(p.stdout)["ips"][0]["address"].split("/")[0]))
    assert ips[0][1].startswith("10.244.1.") and ips[1][1].startswith("10.244.2.")
    wait_for(lambda: "10.244.2.0/24 via 10.244.2.0 dev vxlan.calico" in c.routes("node1"),
             what="node1's vxlan route to node2's podCIDR via node2's derived VTEP")
    assert c.ping(ips[0][0], ips[1][1]) and c.ping(ips[1][0], ips[0][1])
    rx = int(lab.exec(lab.nodes[1].ns, "cat", "/sys/class/net/vxlan.calico/statistics/rx_packets").stdout)
    assert rx > 0  # the pings really crossed the tunnel


def test_dual_stack_podcidrs_give_both_families_and_route_both(make_lab, api, tmp_path):
    """Kubernetes mode, dual-stack: Node.spec.podCIDRs of both families (as the
    controller-manager allocates with --cluster-cidr=<v4>,<v6>) and InternalIPs of both;
    one ADD gives a pod an address from each podCIDR, and pods on two nodes talk over
    IPv4 and IPv6 through derived VTEPs on vxlan.calico and vxlan-v6.calico."""
    lab = make_lab(2, ipv6=True)
    c = LabCluster(lab, None, str(tmp_path))
    for i, n in enumerate(lab.nodes, 1):
        api.upsert("nodes", {"metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
                             "spec": {"podCIDR": f"10.244.{i}.0/24",
                                      "podCIDRs": [f"10.244.{i}.0/24", f"fd00:244:0:{i}::/64"]},
                             "status": {"addresses": [{"type": "InternalIP", "address": n.ip},
                                                      {"type": "InternalIP", "address": n.ip6}]}})
    confs = [start_agent(lab, n, api, tmp_path, n.name, "--default-pool-mode", "vxlan",
                         "--default-pool", "10.244.0.0/16,fd00:244::/56") for n in lab.nodes]
    for n in lab.nodes:
        wait_ready(c, n)
    pods = []
    for i, (n, conf) in enumerate(zip(lab.nodes, confs), 1):
        pod_ns = lab.add_pod_ns(f"ds{i}")
        p = c.cni_run(n, "ADD", f"cid-ds{i}", f"/var/run/netns/{pod_ns}", "default", f"ds{i}", conf=conf)
        assert p.returncode == 0, p.stdout + p.stderr
        addrs = [a["address"] for a in json.loads(p.stdout)["ips"]]
        assert addrs[0].startswith(f"10.244.{i}.") and addrs[1].startswith(f"fd00:244:0:{i}::"), addrs
        pods.append((pod_ns, [a.split("/")[0] for a in addrs]))
    wait_for(lambda: "fd00:244:0:2::/64 via fd00:244:0:2:: dev vxlan-v6.calico" in lab.exec(
        lab.nodes[0].ns, "ip", "-6", "route").stdout, what="node1's IPv6 vxlan route via node2's derived VTEP")
    for (src, _), (_, dst) in ((pods[0], pods[1]), (pods[1], pods[0])):
        assert c.ping(src, dst[0]) and c.ping(src, dst[1]), (src, dst)
    rx = int(lab.exec(lab.nodes[1].ns, "cat", "/sys/class/net/vxlan-v6.calico/statistics/rx_packets").stdout)
    assert rx > 0  # the IPv6 pings really crossed the IPv6 tunnel
