"""Agent restarts under live traffic: a TCP stream between pods on two nodes (real agents,
BIRD, etcd, pods wired by the built CNI binary) while the agent on each end is stopped
with SIGTERM and with SIGKILL and started again."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.lab.cluster import LabCluster, ingress_only_from, wait_for
from tests.lab.netns import sh, tcp_probe

pytestmark = pytest.mark.root

ECHO_PORT, SINK_PORT = 7000, 7001
BULK = 20 * 1024 * 1024  # bytes pushed through the conntrack rule before the restarts

# In pod a: echo lines back on ECHO_PORT (logging every accepted connection), swallow
# bytes on SINK_PORT.
SERVER = r"""
import socket, sys, threading
log = sys.argv[1]
def echo(c, peer):
    with open(log, "a") as f:
        f.write("%s:%d\n" % peer)
    r = c.makefile("rb")
    for line in r:
        c.sendall(line)
def sink(c, peer):
    while c.recv(1 << 16):
        pass
    c.close()
def listen(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, peer = s.accept()
        threading.Thread(target=fn, args=(c, peer), daemon=True).start()
threading.Thread(target=listen, args=(int(sys.argv[2]), echo), daemon=True).start()
threading.Thread(target=listen, args=(int(sys.argv[3]), sink), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# In pod b: one connection, a counter every 50 ms, each echo checked before the next is
# sent.  It never reconnects: any error ends it, and the summary says which message.
CLIENT = r"""
import json, os, socket, sys, time
ip, port, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((ip, port), timeout=10)
s.settimeout(60)
local = "%s:%d" % s.getsockname()
r = s.makefile("rb")
ok, err, max_gap, last = 0, "", 0.0, time.monotonic()
try:
    while not os.path.exists(progress + ".stop"):
        msg = b"%d\n" % (ok + 1)
        s.sendall(msg)
        got = r.readline()
        if got != msg:
            err = "message %d came back as %r" % (ok + 1, got)
            break
        ok += 1
        now = time.monotonic(); max_gap = max(max_gap, now - last); last = now
        with open(progress + ".tmp", "w") as f:
            f.write(str(ok))
        os.replace(progress + ".tmp", progress)
        time.sleep(0.05)
except OSError as e:
    err = "message %d: %s" % (ok + 1, e)
print(json.dumps({"echoed": ok, "error": err, "max_gap": max_gap, "local": local}), flush=True)
"""

BULK_SENDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
chunk = b"x" * 65536
for _ in range(int(sys.argv[3]) // len(chunk)):
    s.sendall(chunk)
s.close()
"""


def progress(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def established_counter(c: LabCluster, node: str, backend: str) -> tuple[str, int]:
    """(rule id, bytes) of cali-FORWARD's conntrack RELATED,ESTABLISHED accept rule."""
    text = sh(f"iptables-{backend}-save", "-c", "-t", "filter", ns=c.lab.node(node).ns).stdout
    for line in text.splitlines():
        m = re.match(r"\[(\d+):(\d+)\] -A cali-FORWARD .*--comment \"?(cali:[0-9a-f]+)\"?.*"
                     r"--ctstate RELATED,ESTABLISHED -j ACCEPT", line)
        if m:
            return m.group(3), int(m.group(2))
    raise AssertionError(f"{node}: no ESTABLISHED accept rule in cali-FORWARD:\n{text}")


def programmed(c: LabCluster, node: str, backend: str) -> dict[str, str]:
    """The node's chains (no counters), ipsets and routes."""
    ns = c.lab.node(node).ns
    out = {}
    for table in ("filter", "nat"):
        text = sh(f"iptables-{backend}-save", "-t", table, ns=ns).stdout
        out[table] = "\n".join(re.sub(r"\s*\[\d+:\d+\]$", "", line)
                               for line in text.splitlines() if not line.startswith("#"))
    out["ipsets"] = sh("ipset", "save", ns=ns).stdout
    out["routes"] = sh("ip", "route", "show", ns=ns).stdout
    return out


def bird_pid(c: LabCluster, node: str) -> int:
    with open(os.path.join(c.node_dir(c.lab.node(node)), "run", "bird", "bird.pid")) as f:
        return int(f.read().strip())


def test_tcp_stream_survives_agent_restarts_on_both_ends(make_cluster, tmp_path):
    c = make_cluster(2)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"})
    b = c.add_pod("default", "b", "node2", labels={"app": "b"})
    # A policy, so the restarted agents have per-policy chains and ipsets to get right.
    c.apply(ingress_only_from("a-from-b", "a", "b"))
    accepts = str(tmp_path / "accepts.log")
    server = c.lab.popen(a.ns, [sys.executable, "-c", SERVER, accepts, str(ECHO_PORT), str(SINK_PORT)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout.readline().strip() == "ready"
    # (probes go to the sink port: every connection to the echo port is logged as the stream's)
    wait_for(lambda: tcp_probe(c.lab, b.ns, a.ip, SINK_PORT, timeout=1), what="b to reach a across nodes")
    prog = str(tmp_path / "progress")
    client = c.lab.popen(b.ns, [sys.executable, "-c", CLIENT, a.ip, str(ECHO_PORT), prog],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: progress(prog) >= 20, what="the stream to start")

    # Fill the established-rule's byte counter on both nodes well past what the stream
    # could add in the seconds a restart takes, so a flushed-and-rebuilt rule shows.
    sh(sys.executable, "-c", BULK_SENDER, a.ip, str(SINK_PORT), str(BULK), ns=b.ns, timeout=60)
    backend = {n: c.status(n)["iptables_backend"] for n in ("node1", "node2")}
    counters = {n: established_counter(c, n, backend[n]) for n in ("node1", "node2")}
    assert all(v >= BULK for _, v in counters.values()), counters
    wait_for(lambda: all(c.status(n)["in_sync"] for n in ("node1", "node2")), what="both agents in sync")
    before = {n: programmed(c, n, backend[n]) for n in ("node1", "node2")}
    birds = {n: bird_pid(c, n) for n in ("node1", "node2")}

    for sig, node in ((signal.SIGTERM, "node1"), (signal.SIGTERM, "node2"),
                      (signal.SIGKILL, "node1"), (signal.SIGKILL, "node2")):
        proc = c.agents[node]
        t0 = time.monotonic()
        c.stop_agent(node, sig=sig, timeout=10)
        print(f"\n{node}: agent gone {time.monotonic() - t0:.2f}s after {sig.name}")
        if sig == signal.SIGTERM:
            assert proc.returncode == 0, f"SIGTERM: exit code {proc.returncode}\n{c.agent_log(node)[-2000:]}"
        # With no agent at all the stream goes on and nothing was removed.
        n0 = progress(prog)
        wait_for(lambda: progress(prog) >= n0 + 10, what=f"the stream to flow with {node}'s agent down")
        assert programmed(c, node, backend[node]) == before[node], f"{node}: stopping the agent changed the dataplane"
        assert bird_pid(c, node) == birds[node], f"{node}: BIRD died with the agent"

        c.start_agent(node)
        n0 = progress(prog)
        rule, count = established_counter(c, node, backend[node])
        assert rule == counters[node][0], f"{node}: the ESTABLISHED rule was rewritten"
        assert count >= counters[node][1], (f"{node}: the rule's byte counter went back from "
                                            f"{counters[node][1]} to {count}: chains were rebuilt")
        counters[node] = (rule, count)
        wait_for(lambda: progress(prog) >= n0 + 10, what=f"the stream to flow after {node}'s agent restarted")
        st = c.status(node)
        assert [e["pod"] for e in st["endpoints"]] == [("a" if node == "node1" else "b")]
        assert st["in_sync"] and st["applies"] >= 1 and not st["last_error"], st
        # the restarted agent's heap is frozen after its first pass (heap.settle)
        wait_for(lambda: c.status(node)["heap_frozen"] > 0, what=f"{node}'s agent to settle its heap")
        assert programmed(c, node, backend[node]) == before[node], f"{node}: the restarted agent programmed something else"
        assert bird_pid(c, node) == birds[node], f"{node}: the restarted agent restarted BIRD"

    # policy still enforced after all that: a pod that is not b cannot reach a
    other = c.add_pod("default", "other", "node2", labels={"app": "other"})
    assert tcp_probe(c.lab, b.ns, a.ip, SINK_PORT, timeout=1)
    assert not tcp_probe(c.lab, other.ns, a.ip, SINK_PORT, timeout=0.5)

    open(prog + ".stop", "w").close()
    out, err = client.communicate(timeout=30)
    summary = json.loads(out.strip().splitlines()[-1])
    print(f"stream: {summary['echoed']} messages echoed in order, longest gap {summary['max_gap']:.3f}s")
    assert summary["error"] == "", summary
    assert summary["echoed"] >= 80
    with open(accepts) as f:
        conns = f.read().split()
    assert conns == [summary["local"]], f"the stream reconnected: server accepted {conns}"


def _wep_keys(c: LabCluster, node: str) -> set[str]:
    p = subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", "get", "--prefix", "--keys-only",
                        f"/tortie/workloadendpoints/{node}/"],
                       capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)
    assert p.returncode == 0, p.stderr
    return {k[len(f"/tortie/workloadendpoints/{node}/"):] for k in p.stdout.split()}


def _put_wep(c: LabCluster, wep) -> None:
    from felix_agent.datastore.etcd import encode_record, record_key
    subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", "put", record_key("/tortie", wep),
                    encode_record(wep).decode()], env={**os.environ, "ETCDCTL_API": "3"}, check=True,
                   capture_output=True, timeout=30)


def test_restart_adopts_every_endpoint_and_drops_stale_ones(make_cluster, tmp_path):
    """After kill -9 and a start, the agent serves exactly the pods wired on its node:
    those with a tortie IPAM address (restored from its IPAM state) and one wired with
    host-local IPAM (adopted from the datastore because its veth is still there).  An
    endpoint record for this node that nothing here serves (left by a DEL that could not
    reach etcd, or written while the agent was down) is removed from the datastore."""
    from felix_agent.model import WorkloadEndpoint

    c = make_cluster(1)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"})
    conf = c.cni_conf(c.lab.node("node1"))
    conf["ipam"] = {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]],
                    "dataDir": str(tmp_path / "host-local")}
    hl_ns = c.lab.add_pod_ns("hl")
    p = c.cni_run("node1", "ADD", "c-hl", f"/var/run/netns/{hl_ns}", "default", "hl", conf=conf)
    assert p.returncode == 0, p.stdout + p.stderr
    hl_iface = next(i["name"] for i in json.loads(p.stdout)["interfaces"] if i["name"].startswith("cali"))
    wait_for(lambda: _wep_keys(c, "node1") == {"default/a", "default/hl"}, what="both endpoints published")

    # a stale record while the agent runs goes at once
    ghost = WorkloadEndpoint(namespace="default", pod="ghost", node="node1", container_id="c-ghost",
                             iface="cali0000ghost00", ips=("10.65.99.99",))
    _put_wep(c, ghost)
    wait_for(lambda: "default/ghost" not in _wep_keys(c, "node1"), what="the stale endpoint to be removed")

    backend = c.status("node1")["iptables_backend"]
    chains_before = programmed(c, "node1", backend)
    c.stop_agent("node1", sig=signal.SIGKILL)
    _put_wep(c, ghost)  # written while nobody serves node1
    c.start_agent("node1")
    st = c.status("node1")
    assert sorted(e["pod"] for e in st["endpoints"]) == ["a", "hl"], st["endpoints"]
    wait_for(lambda: _wep_keys(c, "node1") == {"default/a", "default/hl"},
             what="the stale endpoint to go and the adopted ones to stay")
    assert programmed(c, "node1", backend) == chains_before
    assert f"cali-tw-{hl_iface}" in chains_before["filter"]

    p = c.cni_run("node1", "DEL", "c-hl", f"/var/run/netns/{hl_ns}", "default", "hl", conf=conf)
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for(lambda: _wep_keys(c, "node1") == {"default/a"}, what="the host-local pod's endpoint to go")
    assert [e["pod"] for e in c.status("node1")["endpoints"]] == ["a"]
    wait_for(lambda: f"cali-tw-{hl_iface}" not in programmed(c, "node1", backend)["filter"],
             what="the host-local pod's chains to go")
    assert a.ip
