"""Repair under churn (root, netns lab, real etcd, agent and BIRD): while Pod objects bound
to the node change every ~100 ms (each change is an event pass), a chain flushed by hand
is restored within one resync interval, and a BIRD killed with -9 runs again within
seconds, counted in tortie_bird_restarts_total.  Event passes used to reset the resync
timer, so under churn neither ever happened."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from tests.lab.cluster import LabCluster, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root

RESYNC = 3.0


def churn(c: LabCluster, node: str, stop: threading.Event, count: list[int]) -> None:
    """Rewrite Pod objects bound to `node` with new labels, straight into etcd (etcdctl:
    a few ms each, so the agent sees a change every ~100 ms)."""
    env = {**os.environ, "ETCDCTL_API": "3"}
    i = 0
    while not stop.is_set():
        name = f"churn{i % 5}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "default", "labels": {"gen": str(i)}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}}
        subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", "put", f"/tortie/pods/default/{name}",
                        json.dumps(pod)], env=env, capture_output=True, timeout=10)
        count[0] += 1
        i += 1
        time.sleep(0.1)


def forward_rules(c: LabCluster, node: str) -> int:
    backend = c.status(node)["iptables_backend"]
    text = sh(f"iptables-{backend}-save", "-t", "filter", ns=c.lab.node(node).ns).stdout
    return sum(1 for line in text.splitlines() if line.startswith("-A cali-FORWARD "))


def bird_pid(c: LabCluster, node: str) -> int | None:
    path = os.path.join(c.workdir, node, "run", "bird", "bird.pid")
    try:
        pid = int(open(path).read().strip() or 0)
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def metric(c: LabCluster, node: str, name: str) -> float:
    _, body = c.http(node, "/metrics")
    m = re.search(rf"^{name} ([0-9.e+]+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def test_drift_and_dead_bird_repaired_under_churn(make_cluster):
    c = make_cluster(1, resync_interval=RESYNC)
    node = "node1"
    wait_for(lambda: bird_pid(c, node) is not None, what="bird to run")
    wait_for(lambda: forward_rules(c, node) > 0, what="cali-FORWARD programmed")
    stop, count = threading.Event(), [0]
    t = threading.Thread(target=churn, args=(c, node, stop, count), daemon=True)
    t.start()
    try:
        time.sleep(2 * RESYNC)  # churn well under way, resync timer long since "reset" by it
        assert count[0] > 10

        ns = c.lab.node(node).ns
        backend = c.status(node)["iptables_backend"]
        sh(f"iptables-{backend}", "-t", "filter", "-F", "cali-FORWARD", ns=ns)
        t0 = time.monotonic()
        wait_for(lambda: forward_rules(c, node) > 0, timeout=4 * RESYNC, interval=0.1,
                 what="cali-FORWARD restored under churn")
        repair = time.monotonic() - t0
        assert repair < RESYNC + 2.0, f"drift repaired after {repair:.1f}s, resync interval {RESYNC}s"

        before = metric(c, node, "tortie_bird_restarts_total")
        old = bird_pid(c, node)
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: bird_pid(c, node) not in (None, old), timeout=4 * RESYNC, interval=0.1,
                 what="bird restarted under churn")
        back = time.monotonic() - t0
        assert back < 5.0, f"bird back after {back:.1f}s"
        wait_for(lambda: metric(c, node, "tortie_bird_restarts_total") == before + 1,
                 what="the restart counted")
        assert c.agents[node].poll() is None
    finally:
        stop.set()
        t.join(10)
