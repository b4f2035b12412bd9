"""An ADD cut short by kill -9 of the agent is rolled back by the agent's next start (root,
netns lab, real etcd, agent and CNI plugin).

To stop the agent at a known point of the ADD: etcd is frozen (SIGSTOP), and the ADD is
for a pod the agent has never seen, so after allocating and wiring it waits (up to its
deadline) for the Pod read from etcd.  The test kills the agent once the veth exists.
Before, the restarted agent re-adopted the half-made pod (veth and allocation present)
and kept it until the runtime's DEL; now it removes the veth, its routes, the endpoint and
the address before it serves anything."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest

from podnet.naming import host_iface_for
from tests.lab.cluster import LabCluster, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root


def links(c: LabCluster, node: str) -> str:
    return sh("ip", "-o", "link", "show", ns=c.lab.node(node).ns).stdout


def test_add_interrupted_by_crash_is_rolled_back_at_start(make_cluster):
    c = make_cluster(1)
    node = "node1"
    keep = c.add_pod("default", "keep", node)
    wait_for(lambda: c.status(node)["in_sync"], what="in sync")
    veth = host_iface_for("default", "victim", "c-victim", "eth0")
    pod_ns = c.lab.add_pod_ns("victim")

    os.killpg(c.etcd.proc.pid, signal.SIGSTOP)
    try:
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(
            p=c.cni_run(node, "ADD", "c-victim", f"/var/run/netns/{pod_ns}", "default", "victim")))
        t.start()
        wait_for(lambda: veth in links(c, node), timeout=20, interval=0.02, what="the ADD to wire the veth")
        c.stop_agent(node, sig=signal.SIGKILL)
        t.join(60)
        assert json.loads(out["p"].stdout).get("code") == 11  # the runtime saw the ADD fail
        state = open(os.path.join(c.workdir, node, "state", "ipam", "state.json")).read()
        assert "c-victim" in state and veth in links(c, node), "the crash did not leave a half-made ADD"
    finally:
        os.killpg(c.etcd.proc.pid, signal.SIGCONT)

    c.start_agent(node)
    assert veth not in links(c, node), "the interrupted ADD's veth is still there"
    st = c.status(node)
    assert "c-victim" not in [a["container_id"] for a in st["ipam"]["allocation_list"]]
    assert "victim" not in [e["pod"] for e in st["endpoints"]]
    assert "keep" in [e["pod"] for e in st["endpoints"]]
    routes = sh("ip", "route", "show", ns=c.lab.node(node).ns).stdout
    assert veth not in routes
    assert f"dev {keep.iface}" in routes, "the completed pod lost its route"
    wait_for(lambda: "victim" not in subprocess.run(
        ["etcdctl", f"--endpoints={c.etcd.endpoint}", "get", "--prefix", "--keys-only", "/tortie/workloadendpoints/"],
        capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30).stdout,
        what="no endpoint record of the victim")
    # A retry of the same ADD by the runtime now works from scratch.
    p = c.cni_run(node, "ADD", "c-victim", f"/var/run/netns/{pod_ns}", "default", "victim")
    assert "ips" in json.loads(p.stdout), p.stdout
