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

from tests.lab import Etcd, Lab, delete_namespaces, new_prefix, require_tools, sh, tcp_probe  # noqa: E402

STATE_FILE = "/run/tortie-demo/state.json"
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
POOL = "10.65.0.0/16"
PODS = [("frontend", "web", "node1"), ("frontend", "client", "node2"),
        ("backend", "db", "node3"), ("backend", "cache", "node1")]
LABELS = {"web": {"app": "web"}, "client": {"app": "client"}, "db": {"app": "db"}, "cache": {"app": "cache"}}
SERVER = ("import socket\n"
          "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 80)); s.listen(64)\n"
          "while True:\n c,_=s.accept(); c.sendall(b'hello from tortie\\n'); c.close()\n")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tortiectl(endpoint: str, *args: str, input: str | None = None) -> str:
    p = subprocess.run([os.path.join(VENV_BIN, "tortiectl"), "--etcd-endpoints", endpoint, *args],
                       capture_output=True, text=True, input=input, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"tortiectl {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def cni(lab: Lab, node_ns: str, command: str, pod_ns: str, namespace: str, pod: str, conf: dict) -> dict:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"demo-{namespace}-{pod}",
           "CNI_NETNS": f"/var/run/netns/{pod_ns}", "CNI_IFNAME": "eth0",
           "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}",
           "CNI_PATH": "/usr/lib/cni", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    p = subprocess.run(["ip", "netns", "exec", node_ns, os.path.join(ROOT, "dist", "tortie")],
                       input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"CNI {command} for {namespace}/{pod} failed: {p.stdout.strip()} {p.stderr.strip()}")
    return json.loads(p.stdout) if p.stdout.strip() else {}


def matrix(lab: Lab, pods: dict) -> list[str]:
    names = list(pods)
    width = max(len(n) for n in names) + 2
    lines = [" " * width + "".join(n.rjust(width) for n in names)]
    for src in names:
        row = src.ljust(width)
        for dst in names:
            ok = tcp_probe(lab, pods[src]["ns"], pods[dst]["ip"], 80, timeout=1)
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
        tortiectl(ep, "apply", "-f", "-", input=f"""
apiVersion: tortie.io/v1
kind: IPPool
metadata: {{name: demo-pool}}
spec: {{cidr: {POOL}, blockSize: 26, mode: bgp}}
""")
        for ns_name in ("frontend", "backend"):
            tortiectl(ep, "apply", "-f", "-", input=f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {ns_name}, labels: {{team: {ns_name}}}}}
""")
        for node in lab.nodes:
            d = os.path.join(work, node.name)
            os.makedirs(d, exist_ok=True)
            lab.forward_loopback(node.ns, 2379, etcd.port)
            log = open(os.path.join(d, "agent.log"), "ab")
            lab.popen(node.ns, [os.path.join(VENV_BIN, "tortie-agent"), "--node-name", node.name,
                                "--etcd-endpoints", "127.0.0.1:2379", "--socket-path", f"{d}/agent.sock",
                                "--state-dir", f"{d}/state", "--run-dir", f"{d}/run",
                                "--http-port", "9099", "--resync-interval", "5"],
                      stdout=log, stderr=log)
            log.close()
            say(f"{node.name} ({node.ip}): tortie-agent and BIRD starting")
        save_state()
        for node in lab.nodes:
            wait_ready(lab, node.ns)
        say("agents ready")
        pods = {}
        for namespace, pod, node_name in PODS:
            node = lab.node(node_name)
            tortiectl(ep, "apply", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace, "labels": LABELS[pod]},
                "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "none",
                         "ports": [{"name": "http", "containerPort": 80}]}]}}))
            pod_ns = lab.add_pod_ns(f"{namespace[:2]}-{pod}")
            conf = {"cniVersion": "1.0.0", "name": "demo", "type": "tortie", "mtu": 1500,
                    "agent_socket": f"{work}/{node_name}/agent.sock",
                    "log_file_path": f"{work}/{node_name}/cni.log", "ipam": {"type": "tortie"}}
            res = cni(lab, node.ns, "ADD", pod_ns, namespace, pod, conf)
            ip = res["ips"][0]["address"].split("/")[0]
            lab.popen(pod_ns, ["python3", "-c", SERVER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pods[f"{namespace}/{pod}"] = {"ns": pod_ns, "ip": ip, "node": node_name}
            say(f"pod {namespace}/{pod} on {node_name}: {ip} (wired by dist/tortie)")
        state["pods"] = pods
        save_state()
        wait_mesh(lab)
        say("BGP mesh established; pod routes learnt (proto bird)")
        say("reachability matrix (TCP 80), before any policy:")
        for line in matrix(lab, pods):
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
        tortiectl(ep, "apply", "-f", "-", input=policy)
        time.sleep(1.5)
        say("reachability matrix (TCP 80), with the policies:")
        for line in matrix(lab, pods):
            print("    " + line)
        took = time.monotonic() - t_start
        n1 = lab.nodes[0]
        some_pod = pods["frontend/client"]
        print(f"""
The cluster is running ({took:.0f} s to build). Try:
  ip netns exec {some_pod['ns']} ping -c1 {pods['backend/db']['ip']}     # a pod's shell: ip netns exec {some_pod['ns']} sh
  ip netns exec {n1.ns} ip route                                  # routes on node1 (proto bird)
  ip netns exec {n1.ns} iptables-save | grep cali-                # node1's policy chains
  {VENV_BIN}/tortiectl --etcd-endpoints {ep} get pods -A
  {VENV_BIN}/tortiectl --etcd-endpoints {ep} get networkpolicies -A
  ip netns exec {n1.ns} {VENV_BIN}/tortiectl status                 # node1's agent: sync, endpoints, BGP
  ip netns exec {n1.ns} {VENV_BIN}/tortiectl ipam show
  make demo-down                                                  # removes everything
Agent logs: {work}/node*/agent.log
""")
    except BaseException:
        say("demo failed; removing what it created")
        lab.teardown()
        etcd.close()
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(STATE_FILE):
            os.unlink(STATE_FILE)
        raise


def wait_ready(lab: Lab, ns: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = sh("python3", "-c", "import urllib.request,sys;"
               "sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9099/readyz',timeout=1).status==200 else 1)",
               ns=ns, check=False)
        if p.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"agent in {ns} not ready after {timeout}s")


def wait_mesh(lab: Lab, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(sh("ip", "route", "show", "proto", "bird", ns=n.ns, check=False).stdout.count("via") >= 2
               for n in lab.nodes):
            return
        time.sleep(0.5)
    raise RuntimeError("BGP routes did not converge")


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
