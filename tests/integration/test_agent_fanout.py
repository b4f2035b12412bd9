"""A whole tortie-agent on the kubernetes datastore through tortie-fanout: the agent has
no kubeconfig and no route to the API; the stand-in kube-apiserver (tests/fakes/apiserver.py,
serving the recorded v1.28 objects) is watched by a real tortie-fanout process on the root
namespace's loopback, which the agent reaches through its node's own loopback
(tests/lab/nsproxy.py). Killing the fan-out must leave the agent up, unready, its rules in
place; the fan-out's return makes it ready again."""
import json
import os
import signal
import sys

import pytest

from tests.fakes.apiserver import FakeAPIServer
from tests.lab.cluster import LabCluster, wait_for
from tests.lab.fanout import Fanout

pytestmark = pytest.mark.root


def status(c: LabCluster, node) -> dict | None:
    code, body = c.http(node, "/status")
    return json.loads(body) if code == 200 else None


def test_an_agent_fed_by_the_fanout_wires_pods_and_survives_the_fanouts_loss(make_lab, tmp_path):
    lab = make_lab(1)
    node = lab.nodes[0]
    c = LabCluster(lab, None, str(tmp_path))
    with FakeAPIServer(replay=False) as api:
        fanout = Fanout(api.kubeconfig(str(tmp_path / "kubeconfig")), str(tmp_path / "fanout.log"),
                        "--ping-interval", "1")
        fanout.start()
        try:
            lab.forward_loopback(node.ns, fanout.port, fanout.port)
            d = tmp_path / "vm"
            d.mkdir()
            log = open(d / "agent.log", "wb")
            # The recordings' only node is "vm" with spec.podCIDR 10.244.0.0/24.
            agent = lab.popen(node.ns, [os.path.join(os.path.dirname(sys.executable), "tortie-agent"),
                                        "--datastore", "kubernetes", "--fanout-endpoints",
                                        f"127.0.0.1:{fanout.port}", "--node-name", "vm",
                                        "--default-pool", "10.244.0.0/16", "--socket-path", str(d / "agent.sock"),
                                        "--state-dir", str(d / "state"), "--run-dir", str(d / "run")],
                              stdout=log, stderr=log)
            conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
                    "agent_socket": str(d / "agent.sock"), "log_file_path": str(d / "cni.log"),
                    "ipam": {"type": "tortie"}}
            st = wait_for(lambda: (s := status(c, node)) and s["ready"] and s, timeout=60,
                          what="the agent ready through the fan-out")
            assert st["datastore"] == "kubernetes" and st["in_sync"]
            assert [b["cidr"] for b in st["ipam"]["blocks"]] == ["10.244.0.0/24"]

            pod_ns = lab.add_pod_ns("x-a")
            p = c.cni_run(node, "ADD", "cid-x-a", f"/var/run/netns/{pod_ns}", "x", "a", conf=conf)
            assert p.returncode == 0, p.stdout + p.stderr
            iface = json.loads(p.stdout)["interfaces"][0]["name"]

            def policy_rules() -> list[str]:
                save = lab.exec(node.ns, "iptables-save", "-t", "filter").stdout
                return [l for l in save.splitlines() if l.startswith(f"-A cali-tw-{iface} ") and "-j cali-pi-" in l]
            # x's recorded default-deny policies reached the agent through the fan-out.
            rules = policy_rules()
            assert rules
            assert fanout.metrics()["tortie_fanout_clients"] == 1

            fanout.kill(signal.SIGKILL)
            st = wait_for(lambda: (s := status(c, node)) and not s["in_sync"] and s, timeout=30,
                          what="the agent out of sync without its fan-out")
            assert not st["ready"] and "tortie-fanout 127.0.0.1:" in st["sync_reason"], st
            assert agent.poll() is None and policy_rules() == rules  # up, rules kept

            fanout.start()
            wait_for(lambda: (s := status(c, node)) and s["ready"], timeout=60, what="ready again")
            assert policy_rules() == rules
            p = c.cni_run(node, "DEL", "cid-x-a", f"/var/run/netns/{pod_ns}", "x", "a", conf=conf)
            assert p.returncode == 0, p.stdout + p.stderr
        finally:
            fanout.kill()
