"""The agent while its datastore is gone: etcd stopped for 20 seconds under a running
two-node cluster (real etcd, agents, BIRD, pods wired by the built CNI binary)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.lab.cluster import VENV_BIN, LabCluster, ingress_only_from, wait_for
from tests.lab.etcd import free_port
from tests.lab.netns import sh

pytestmark = pytest.mark.root

OUTAGE = 20.0  # seconds etcd is away

POLICY = ingress_only_from("only-c", "b", "c")


def dataplane_snapshot(c: LabCluster, node: str) -> dict[str, str]:
    """What the agent programs on a node, without counters: both iptables tables, the
    ipsets and the routing table."""
    ns = c.lab.node(node).ns
    backend = c.status(node)["iptables_backend"]
    out = {}
    for table in ("filter", "nat"):
        text = sh(f"iptables-{backend}-save", "-t", table, ns=ns).stdout
        lines = [re.sub(r"\s*\[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#")]
        out[table] = "\n".join(lines)
    out["ipsets"] = sh("ipset", "save", ns=ns).stdout
    out["routes"] = sh("ip", "route", "show", ns=ns).stdout
    return out


def tortiectl_status(c: LabCluster, node: str) -> str:
    """`tortiectl status` as an operator on the node runs it."""
    return sh(os.path.join(VENV_BIN, "tortiectl"), "status", ns=c.lab.node(node).ns).stdout


def etcd_keys(c: LabCluster, prefix: str) -> list[str]:
    p = subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", "get", "--prefix", "--keys-only", prefix],
                       capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)
    assert p.returncode == 0, p.stderr
    return [k for k in p.stdout.split() if k]


def test_etcd_outage_keeps_dataplane_and_converges(make_cluster):
    """etcd goes away for 20 s.  Both agents must notice (/readyz 503, /status in_sync
    false, `tortiectl status` says NOT in sync), keep every chain, ipset and route exactly
    as they were (also across a restart of one agent in the middle of the outage), pods on
    different nodes keep talking over new connections, and a node still wires and unwires
    its own pods.

    The change "during the outage": nobody can write to an etcd that is down, so the test
    starts the same etcd (same data dir) for a moment on a different client port, which the
    agents cannot reach (their node's 127.0.0.1:2379 forwards to the old port), and writes
    there with tortiectl/etcdctl: a NetworkPolicy, a new Pod object, and the loss of
    node2's Node record and of pod c's WorkloadEndpoint (as an etcd restored from an old
    backup would lose them).  When etcd comes back on its own port the agents find a
    datastore that changed while they were cut off: they must relist, enforce the policy,
    publish again what only they know (the Node record, c's endpoint, the pod wired during
    the outage) and remove the endpoint of the pod deleted during the outage."""
    c = make_cluster(2)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"}, serve=["tcp:80"])
    b = c.add_pod("default", "b", "node2", labels={"app": "b"}, serve=["tcp:80"])
    cpod = c.add_pod("default", "c", "node1", labels={"app": "c"})
    gone = c.add_pod("default", "gone", "node2", labels={"app": "c"})
    wait_for(lambda: c.probe(a, b.ip, 80) and c.probe(b, a.ip, 80), what="a and b to talk across nodes")
    for n in ("node1", "node2"):
        wait_for(lambda: c.status(n)["in_sync"], what=f"{n} in sync")
    before = {n: dataplane_snapshot(c, n) for n in ("node1", "node2")}

    t_down = time.monotonic()
    port = c.etcd.port
    c.etcd.stop()
    for n in ("node1", "node2"):
        wait_for(lambda: c.http(n, "/readyz")[0] == 503, timeout=15, what=f"{n} to report not ready")
        st = c.status(n)
        assert st["in_sync"] is False and st["sync_reason"], st
        assert "NOT in sync" in tortiectl_status(c, n)
        assert c.http(n, "/livez")[0] == 200, "an agent that lost etcd is alive, just not ready"
    print(f"\nboth agents reported not-in-sync {time.monotonic() - t_down:.2f}s after etcd stopped")

    # The changes the agents must find afterwards, written where they cannot see them.
    c.etcd.port = free_port()
    c.etcd.start()
    c.apply(POLICY)
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "offline", "namespace": "default",
                                                             "labels": {"app": "c"}},
             "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "none"}]}})
    c.delete("node", "node2")
    assert etcd_keys(c, "/tortie/workloadendpoints/node1/default/c")
    subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", "del", "/tortie/workloadendpoints/node1/default/c"],
                   env={**os.environ, "ETCDCTL_API": "3"}, check=True, capture_output=True)
    c.etcd.stop()
    c.etcd.port = port

    def probes_pass() -> None:
        assert c.probe(a, b.ip, 80) and c.probe(b, a.ip, 80), "traffic stopped during the etcd outage"
        assert c.ping(cpod, b.ip)

    probes_pass()
    for n in ("node1", "node2"):
        assert dataplane_snapshot(c, n) == before[n], f"{n}'s dataplane changed while etcd was away"

    # An agent restarted while etcd is away must not touch the dataplane either: it has
    # no datastore to know what is right, so it keeps what is there.
    t0 = time.monotonic()
    c.stop_agent("node2", timeout=10)
    print(f"node2's agent stopped {time.monotonic() - t0:.2f}s after SIGTERM (etcd down)")
    c.start_agent("node2", wait=False)
    wait_for(lambda: c.http("node2", "/livez")[0] == 200, timeout=30, what="node2's agent to come up")
    assert c.http("node2", "/readyz")[0] == 503
    assert [e["pod"] for e in c.status("node2")["endpoints"]] == ["b", "gone"], "endpoints not adopted"
    probes_pass()
    assert dataplane_snapshot(c, "node2") == before["node2"], "the agent restarted without etcd changed things"

    # A pod cannot start on a node whose agent has never seen the datastore (it knows no
    # policy to protect it with): a quick "try again", and nothing is left of it.
    ns = c.lab.add_pod_ns("early")
    p = c.cni_run("node2", "ADD", "c-early", f"/var/run/netns/{ns}", "default", "early")
    assert p.returncode != 0 and json.loads(p.stdout)["code"] == 11, p.stdout
    assert "eth0" not in sh("ip", "-o", "link", "show", ns=ns).stdout
    assert [e["pod"] for e in c.status("node2")["endpoints"]] == ["b", "gone"]
    assert not [a for a in c.status("node2")["ipam"]["allocation_list"] if a["container_id"] == "c-early"]

    # The nodes still serve their own pods: DEL and ADD work from local IPAM blocks.
    assert c.del_pod(gone).returncode == 0
    offline = c.add_pod("default", "offline", "node1", labels={"app": "c"}, register=False)
    assert c.ping(offline, cpod.ip)

    probes = 0
    while time.monotonic() - t_down < OUTAGE:
        probes_pass()
        probes += 1
        time.sleep(1)
    for n in ("node1", "node2"):
        assert c.http(n, "/readyz")[0] == 503
    print(f"{probes} more rounds of probes passed during the {OUTAGE:.0f}s outage")

    t_up = time.monotonic()
    c.etcd.start()
    for n in ("node1", "node2"):
        c.wait_ready(n, timeout=60)
        st = c.status(n)
        assert st["in_sync"] and not st["last_error"], st
        assert "NOT in sync" not in tortiectl_status(c, n)
    print(f"both agents ready again {time.monotonic() - t_up:.2f}s after etcd came back")
    wait_for(lambda: not c.probe(a, b.ip, 80, timeout=0.5), what="the policy written during the outage")
    print(f"policy enforced {time.monotonic() - t_up:.2f}s after etcd came back")
    # c's endpoint and the pod wired during the outage are published again by node1, so
    # node2 knows their addresses belong to app=c and lets them in.
    wait_for(lambda: etcd_keys(c, "/tortie/workloadendpoints/node1/default/c"), what="c's endpoint re-published")
    wait_for(lambda: etcd_keys(c, "/tortie/workloadendpoints/node1/default/offline"),
             what="the endpoint wired during the outage published")
    wait_for(lambda: c.probe(cpod, b.ip, 80), what="the policy to let c in")
    wait_for(lambda: c.probe(offline, b.ip, 80), what="the policy to let the pod wired offline in")
    wait_for(lambda: not etcd_keys(c, "/tortie/workloadendpoints/node2/default/gone"),
             what="the endpoint of the pod deleted during the outage to go")
    wait_for(lambda: etcd_keys(c, "/tortie/nodes/node2"), what="node2 to register itself again")
    assert c.probe(b, a.ip, 80), "a has no policy"
    # and the cluster takes new work again
    d = c.add_pod("default", "d", "node2", labels={"app": "c"})
    assert c.probe(d, b.ip, 80)
