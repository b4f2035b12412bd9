"""ADDs while etcd is unreachable (root, netns lab, real etcd, agent, CNI plugin).

1. A synced node, etcd frozen (SIGSTOP: every call hangs until its deadline): four ADDs
   at once of pods the agent has never seen (each reads its Pod from etcd first) all
   succeed from the node's own block.  They used to end with "agent connection failed":
   the first read to time out closed the shared etcd channel, gRPC raised CancelledError
   in the others, and those requests closed their sockets without a reply or a log line.
2. The agent restarted while etcd is down (it has never synced, so it has no policy to
   program a pod with): an ADD fails with CNI code 11 naming the datastore, the agent logs
   it, and nothing of the pod is left behind.
"""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from podnet.naming import host_iface_for
from tests.lab.cluster import LabCluster, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root


def cni_add(c: LabCluster, node: str, name: str) -> tuple[dict, str]:
    ns = c.lab.add_pod_ns(name)
    p = c.cni_run(node, "ADD", f"c-{name}", f"/var/run/netns/{ns}", "default", name)
    return (json.loads(p.stdout) if p.stdout.strip() else {}), ns


def test_add_during_outage_answers(make_cluster):
    c = make_cluster(1)
    node = "node1"
    c.add_pod("default", "first", node)  # the node owns a block now
    wait_for(lambda: c.status(node)["in_sync"], what="in sync")

    os.killpg(c.etcd.proc.pid, signal.SIGSTOP)
    try:
        results: dict[str, dict] = {}

        def one(i: int) -> None:
            results[f"frozen{i}"] = cni_add(c, node, f"frozen{i}")[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        os.killpg(c.etcd.proc.pid, signal.SIGCONT)
    for name, res in results.items():
        assert "ips" in res, f"ADD {name} during the freeze: {res}"
        assert res["ips"][0]["address"].startswith("10.65.")
    assert len(results) == 4
    assert c.agents[node].poll() is None, "the agent exited"

    # 2: etcd down, agent restarted: never synced, so the ADD fails, and says why.
    c.etcd.stop()
    c.stop_agent(node, sig=signal.SIGKILL)
    c.start_agent(node, wait=False)
    wait_for(lambda: c.http(node, "/livez")[0] == 200, what="agent up")
    res, pod_ns = cni_add(c, node, "down")
    assert res.get("code") == 11, res
    assert "datastore" in res.get("msg", ""), res
    wait_for(lambda: "c-down" in c.agent_log(node), what="the ADD's log line")
    links = sh("ip", "-o", "link", "show", ns=c.lab.node(node).ns).stdout
    assert host_iface_for("default", "down", "c-down", "eth0") not in links, "the failed ADD left its veth"
    allocs = [a["container_id"] for a in c.status(node)["ipam"]["allocation_list"]]
    assert "c-down" not in allocs, "the failed ADD's address was not released"

    c.etcd.start()
    c.wait_ready(node)
    assert c.agents[node].poll() is None
