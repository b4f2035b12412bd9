"""A whole tortie-agent in kubernetes-datastore mode, as it runs on kind, against
tests/fakes/apiserver.py: a stand-in for kube-apiserver v1.28 that replays real recorded
responses (../shared/k8s-api; no kube-apiserver can run on these machines). The agent
reaches it through the node's own loopback (tests/lab/nsproxy.py)."""
import json
import os
import subprocess
import sys

import pytest

from tests.fakes.apiserver import FakeAPIServer
from tests.lab.cluster import LabCluster, wait_for

pytestmark = pytest.mark.root


def test_agent_on_the_kubernetes_datastore_wires_a_recorded_pod_under_its_policies(make_lab, tmp_path):
    lab = make_lab(1)
    node = lab.nodes[0]
    api = FakeAPIServer().start()
    try:
        lab.forward_loopback(node.ns, api.port, api.port)
        kubeconfig = api.kubeconfig(str(tmp_path / "kubeconfig"))
        d = tmp_path / "vm"
        d.mkdir()
        log = open(d / "agent.log", "wb")
        # The recordings' only node is "vm" with spec.podCIDR 10.244.0.0/24.
        lab.popen(node.ns, [os.path.join(os.path.dirname(sys.executable), "tortie-agent"),
                            "--datastore", "kubernetes", "--kubeconfig", kubeconfig, "--node-name", "vm",
                            "--default-pool", "10.244.0.0/16", "--socket-path", str(d / "agent.sock"),
                            "--state-dir", str(d / "state"), "--run-dir", str(d / "run"), "--http-port", "9099"],
                  stdout=log, stderr=log)
        c = LabCluster(lab, None, str(tmp_path))  # its HTTP and CNI helpers; no etcd in this mode
        status = wait_for(lambda: (s := c.http(node, "/status"))[0] == 200 and json.loads(s[1])["ready"]
                          and json.loads(s[1]), timeout=60, what="the agent ready on the kubernetes datastore")
        assert status["datastore"] == "kubernetes" and status["in_sync"]
        assert [b["cidr"] for b in status["ipam"]["blocks"]] == ["10.244.0.0/24"]

        # CNI ADD of the recorded pod x/a (labels pod=a), through the real binary and the agent.
        pod_ns = lab.add_pod_ns("x-a")
        conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
                "agent_socket": str(d / "agent.sock"), "log_file_path": str(d / "cni.log"),
                "ipam": {"type": "tortie"}}
        p = c.cni_run(node, "ADD", "cid-x-a", f"/var/run/netns/{pod_ns}", "x", "a", conf=conf)
        assert p.returncode == 0, p.stdout + p.stderr
        ip = json.loads(p.stdout)["ips"][0]["address"]
        assert ip.startswith("10.244.0.") and ip.endswith("/32")

        # The recorded namespace x has default-deny ingress and egress policies selecting
        # every pod: their chains must exist when ADD returns, and x/a's endpoint chains
        # must jump to them.
        save = lab.exec(node.ns, "iptables-save", "-t", "filter").stdout
        policy_chains = {l.split()[0][1:] for l in save.splitlines() if l.startswith((":cali-pi-", ":cali-po-"))}
        assert policy_chains, save
        iface = json.loads(p.stdout)["interfaces"][0]["name"]
        tw = [l for l in save.splitlines() if l.startswith(f"-A cali-tw-{iface} ")]
        assert any("-j cali-pi-" in l for l in tw), tw
        st = json.loads(c.http(node, "/status")[1])
        assert [(e["namespace"], e["pod"]) for e in st["endpoints"]] == [("x", "a")]
        p = c.cni_run(node, "DEL", "cid-x-a", f"/var/run/netns/{pod_ns}", "x", "a", conf=conf)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "cali" not in subprocess.run(["ip", "-n", node.ns, "-o", "link"], capture_output=True,
                                            text=True).stdout
    finally:
        api.stop()
