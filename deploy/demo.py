"""`make demo` / `make demo-down`: a 3-node tortie cluster in network namespaces.

up:   real etcd on loopback, three node namespaces on one segment, a tortie-agent and BIRD
      (full mesh) in each, pods wired by the built CNI binary (dist/tortie) in two
      namespaces, a reachability matrix, then a deny-all plus an allow policy applied with
      tortiectl and the matrix again.  The cluster stays up; the state file says what to
      remove.
down: kills what the demo started and deletes its namespaces and files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.lab import Etcd, Lab, delete_namespaces, new_prefix, require_tools  # noqa: E402
from tests.lab.cluster import LabCluster, wait_for  # noqa: E402

STATE_FILE = "/run/tortie-demo/state.json"
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
POOL = "10.65.0.0/16"
PODS = [("frontend", "web", "node1"), ("frontend", "client", "node2"),
        ("backend", "db", "node3"), ("backend", "cache", "node1")]
LABELS = {"web": {"app": "web"}, "client": {"app": "client"}, "db": {"app": "db"}, "cache": {"app": "cache"}}


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def matrix(cluster: LabCluster, pods: dict) -> list[str]:
    names = list(pods)
    width = max(len(n) for n in names) + 2
    lines = [" " * width + "".join(n.rjust(width) for n in names)]
    for src in names:
        row = src.ljust(width)
        for dst in names:
            ok = cluster.probe(pods[src], pods[dst].ip, 80, timeout=1)
            row += ("ok" if ok else "--").rjust(width)
        lines.append(row)
    return lines


def up() -> None:
    if os.path.exists(STATE_FILE):
        say("a demo is already running; `make demo-down` first")
        sys.exit(1)
    require_tools(["ip", "ss", "bird", "birdc", "etcd", "iptables", "ipset", "ping"])
    if not os.path.exists(os.path.join(ROOT, "dist", "tortie")):
        raise SystemExit("dist/tortie is missing: run `make cni-binary`")
    t_start = time.monotonic()
    prefix = new_prefix("demo")
    work = tempfile.mkdtemp(prefix="tortie-demo-")
    os.makedirs(os.path.dirname(STATE_FILE), exist_ok=True)
    lab = Lab(prefix=prefix)
    etcd = Etcd(data_dir=os.path.join(work, "etcd"))
    os.makedirs(etcd.data_dir, exist_ok=True)
    state = {"prefix": prefix, "work": work, "pids": []}

    def save_state():
        state["pids"] = [p.pid for p in lab.procs] + ([etcd.proc.pid] if etcd.proc else [])
        with open(STATE_FILE, "w") as f:
            json.dump(state, f)

    try:
        say(f"starting etcd on 127.0.0.1:{etcd.port}")
        etcd.start()
        ep = etcd.endpoint
        save_state()
        say("building 3 node namespaces on one segment (192.168.100.0/24)")
        lab.build(3)
        save_state()
        cluster = LabCluster(lab, etcd, work, cni=[os.path.join(ROOT, "dist", "tortie")])
        cluster.apply_pool(POOL, mode="bgp", name="demo-pool")
        for ns_name in ("frontend", "backend"):
            cluster.apply_namespace(ns_name, {"team": ns_name})
        for node in lab.nodes:
            cluster.start_agent(node, wait=False)
            say(f"{node.name} ({node.ip}): tortie-agent and BIRD starting")
        save_state()
        for node in lab.nodes:
            cluster.wait_ready(node)
        say("agents ready")
        pods = {}
        for namespace, pod, node_name in PODS:
            p = cluster.add_pod(namespace, pod, node_name, labels=LABELS[pod],
                                ports=[{"name": "http", "containerPort": 80}], serve=["tcp:80"])
            pods[p.key] = p
            say(f"pod {p.key} on {node_name}: {p.ip} (wired by dist/tortie)")
        state["pods"] = {k: {"ns": p.ns, "ip": p.ip, "node": p.node} for k, p in pods.items()}
        save_state()
        wait_for(lambda: all(cluster.routes(n, "proto", "bird").count("via") >= 2 for n in lab.nodes),
                 timeout=60, what="BGP routes on every node")
        say("BGP mesh established; pod routes learnt (proto bird)")
        say("reachability matrix (TCP 80), before any policy:")
        for line in matrix(cluster, pods):
            print("    " + line)
        policy = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: backend}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web-to-db, namespace: backend}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
    - from:
        - namespaceSelector: {matchLabels: {team: frontend}}
          podSelector: {matchLabels: {app: web}}
      ports: [{protocol: TCP, port: 80}]
"""
        say("applying policies with tortiectl: backend default-deny ingress, and allow frontend/web -> backend/db:80")
        cluster.apply(policy)
        wait_for(lambda: not cluster.probe(pods["frontend/client"], pods["backend/db"].ip, 80, timeout=0.5),
                 timeout=30, what="the policy to take effect")
        say("reachability matrix (TCP 80), with the policies:")
        for line in matrix(cluster, pods):
            print("    " + line)
        took = time.monotonic() - t_start
        n1 = lab.nodes[0]
        client, web = pods["frontend/client"], pods["frontend/web"]
        # Every line below is run by tests/integration/test_demo.py as printed: keep them true
        # for the policies above (frontend has none; backend lets only web reach db on TCP 80).
        tries = [
            (f"ip netns exec {client.ns} ping -c1 {web.ip}", "frontend/client -> frontend/web: allowed"),
            (f"ip netns exec {client.ns} sh", "a shell inside frontend/client (exit to leave)"),
            (f"ip netns exec {n1.ns} ip route", "routes on node1 (proto bird)"),
            (f"ip netns exec {n1.ns} iptables-save | grep cali-", "node1's policy chains"),
            (f"{VENV_BIN}/tortiectl --etcd-endpoints {ep} get pods -A -o wide", "pods and their addresses"),
            (f"{VENV_BIN}/tortiectl --etcd-endpoints {ep} get networkpolicies -A", ""),
            (f"ip netns exec {n1.ns} {VENV_BIN}/tortiectl status", "node1's agent: sync, endpoints, BGP"),
            (f"ip netns exec {n1.ns} {VENV_BIN}/tortiectl ipam show", ""),
            ("make demo-down", "removes everything"),
        ]
        print(f"\nThe cluster is running ({took:.0f} s to build). Try (as root, from this directory):")
        for cmd, why in tries:
            print(f"  {cmd}  # {why}" if why else f"  {cmd}")
        print(f"Agent logs: {work}/node*/agent.log\n")
    except BaseException:
        say("demo failed; removing what it created")
        lab.teardown()
        etcd.close()
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(STATE_FILE):
            os.unlink(STATE_FILE)
        raise


def down() -> None:
    if not os.path.exists(STATE_FILE):
        print("demo-down: no demo is running")
        return
    with open(STATE_FILE) as f:
        state = json.load(f)
    import signal
    for pid in state.get("pids", []):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    gone = delete_namespaces(state["prefix"])
    shutil.rmtree(state["work"], ignore_errors=True)
    os.unlink(STATE_FILE)
    print(f"demo-down: removed {len(gone)} namespaces, the processes and {state['work']}")


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
