"""A whole tortie cluster in the netns lab: real etcd, a tortie-agent (with its BIRD) in
every node namespace, pods wired by the real CNI plugin, objects written with tortiectl.

Shared by the integration tests, the benchmarks and `make demo`:

    with Etcd() as etcd, Lab(prefix=new_prefix()) as lab:
        c = LabCluster(lab.build(3), etcd, workdir)
        c.apply_pool("10.65.0.0/16", mode="bgp")
        c.start_agents()
        a = c.add_pod("default", "a", "node1", labels={"app": "a"})
        assert c.probe(a, b.ip, 80)

Agents reach etcd through each node's own 127.0.0.1:2379 (tests/lab/nsproxy.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from tests.lab.cnibin import ROOT, cni_command
from tests.lab.etcd import Etcd
from tests.lab.netns import Lab, LabNode, sh

VENV_BIN = os.path.dirname(sys.executable) if os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "tortie-agent")) else os.path.join(ROOT, ".venv", "bin")
AGENT_HTTP_PORT = 9099

# One long-lived server per pod: TCP on the given ports, UDP echo on the same numbers.
SERVER = r"""
import socket, sys, threading
def bound(kind, port):
    # Dual-stack: one socket on :: takes IPv4 (as ::ffff:a.b.c.d) and IPv6 clients alike.
    s = socket.socket(socket.AF_INET6, kind); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", port))
    return s
def tcp(port, who=False):
    s = bound(socket.SOCK_STREAM, port); s.listen(256)
    while True:
        c, addr = s.accept()
        peer = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
        try: c.sendall((peer + "\n").encode() if who else b"ok\n")
        except OSError: pass
        c.close()
def udp(port):
    s = bound(socket.SOCK_DGRAM, port)
    while True:
        data, addr = s.recvfrom(2048); s.sendto(b"ok:" + data, addr)
for p in sys.argv[1:]:
    proto, port = p.split(":")
    # "who:<port>": TCP that answers with the client's address as this pod sees it (NAT checks)
    fn, args = (tcp, (int(port), True)) if proto == "who" else (tcp if proto == "tcp" else udp, (int(port),))
    threading.Thread(target=fn, args=args, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@dataclass
class LabPod:
    namespace: str
    name: str
    node: str
    ns: str  # the pod's network namespace
    ip: str  # its IPv4 address ("" in an IPv6-only cluster)
    container_id: str
    iface: str = ""
    result: dict = field(default_factory=dict)
    ip6: str = ""  # its IPv6 address (a dual-stack or IPv6-only cluster)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class LabCluster:
    def __init__(self, lab: Lab, etcd: Etcd, workdir: str, *, cni: list[str] | None = None,
                 resync_interval: float = 5.0, agent_args: tuple[str, ...] = ()):
        self.lab, self.etcd, self.workdir = lab, etcd, workdir
        self.cni = cni or cni_command()
        self.resync_interval = resync_interval
        self.agent_args = tuple(agent_args)
        self.agents: dict[str, subprocess.Popen] = {}
        self.pods: dict[str, LabPod] = {}
        self._proxied: set[str] = set()
        os.makedirs(workdir, exist_ok=True)

    # -- datastore ----------------------------------------------------------------------

    def tortiectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([os.path.join(VENV_BIN, "tortiectl"), "--etcd-endpoints", self.etcd.endpoint,
                            *self.etcd.client_args, *args],
                           capture_output=True, text=True, input=input, timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"tortiectl {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def apply(self, objs: str | dict | list) -> None:
        """Apply YAML text, or one object / a list of objects as dicts."""
        if isinstance(objs, dict):
            objs = [objs]
        text = objs if isinstance(objs, str) else "\n---\n".join(json.dumps(o) for o in objs)
        self.tortiectl("apply", "-f", "-", input=text)

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        args = ["delete", kind, name] + (["-n", namespace] if namespace else [])
        self.tortiectl(*args)

    def apply_pool(self, cidr: str, mode: str = "bgp", name: str = "pool", block_size: int | None = None,
                   cross_subnet: bool = False, nat_outgoing: bool = False) -> None:
        # blockSize None: 26 for IPv4 as before, the pool's own default (/122) for IPv6
        spec = {"cidr": cidr, "mode": mode, "natOutgoing": nat_outgoing}
        if block_size is not None or ":" not in cidr:
            spec["blockSize"] = block_size or 26
        if cross_subnet:
            spec["crossSubnet"] = True
        self.apply({"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": name}, "spec": spec})

    def apply_namespace(self, name: str, labels: dict | None = None) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})

    # -- agents -------------------------------------------------------------------------

    def node_dir(self, node: LabNode) -> str:
        d = os.path.join(self.workdir, node.name)
        os.makedirs(d, exist_ok=True)
        return d

    def socket_path(self, node: LabNode | str) -> str:
        node = self.lab.node(node) if isinstance(node, str) else node
        return os.path.join(self.node_dir(node), "agent.sock")

    def start_agent(self, node: LabNode | str, wait: bool = True, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        node = self.lab.node(node) if isinstance(node, str) else node
        d = self.node_dir(node)
        if node.ns not in self._proxied:
            self.lab.forward_loopback(node.ns, 2379, self.etcd.port)
            self._proxied.add(node.ns)
        log = open(os.path.join(d, "agent.log"), "ab")
        p = self.lab.popen(node.ns, [os.path.join(VENV_BIN, "tortie-agent"), "--node-name", node.name,
                                     "--etcd-endpoints", f"{self.etcd.scheme}127.0.0.1:2379", *self.etcd.client_args,
                                     "--socket-path", self.socket_path(node),
                                     "--state-dir", f"{d}/state", "--run-dir", f"{d}/run",
                                     "--http-port", str(AGENT_HTTP_PORT),
                                     "--resync-interval", str(self.resync_interval), *self.agent_args, *extra],
                           stdout=log, stderr=log)
        log.close()
        self.agents[node.name] = p
        if wait:
            self.wait_ready(node)
        return p

    def start_agents(self, wait: bool = True) -> None:
        for n in self.lab.nodes:
            self.start_agent(n, wait=False)
        if wait:
            for n in self.lab.nodes:
                self.wait_ready(n)

    def stop_agent(self, node: LabNode | str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        node = self.lab.node(node) if isinstance(node, str) else node
        p = self.agents.pop(node.name, None)
        if p is None or p.poll() is not None:
            return
        # The agent runs under `ip netns exec` in its own process group.
        os.killpg(p.pid, sig)
        p.wait(timeout=timeout)

    def agent_log(self, node: LabNode | str) -> str:
        node = self.lab.node(node) if isinstance(node, str) else node
        try:
            with open(os.path.join(self.node_dir(node), "agent.log")) as f:
                return f.read()
        except OSError:
            return ""

    def http(self, node: LabNode | str, path: str) -> tuple[int, str]:
        """GET http://127.0.0.1:9099<path> inside the node; (status, body) or (0, error)."""
        node = self.lab.node(node) if isinstance(node, str) else node
        code = ("import urllib.request,urllib.error,sys\n"
                "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=3); print(r.status); sys.stdout.write(r.read().decode())\n"
                "except urllib.error.HTTPError as e:\n print(e.code); sys.stdout.write(e.read().decode())\n"
                "except Exception as e:\n print(0); sys.stdout.write(str(e))\n")
        p = sh(sys.executable, "-c", code, f"http://127.0.0.1:{AGENT_HTTP_PORT}{path}", ns=node.ns, check=False)
        first, _, rest = p.stdout.partition("\n")
        return (int(first) if first.strip().isdigit() else 0), rest

    def status(self, node: LabNode | str) -> dict:
        code, body = self.http(node, "/status")
        if code != 200:
            raise RuntimeError(f"agent status of {node}: {code} {body[:200]}")
        return json.loads(body)

    def wait_ready(self, node: LabNode | str, timeout: float = 60) -> None:
        node = self.lab.node(node) if isinstance(node, str) else node
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.agents.get(node.name)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"agent on {node.name} exited ({p.returncode}):\n{self.agent_log(node)[-3000:]}")
            if self.http(node, "/readyz")[0] == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"agent on {node.name} not ready after {timeout}s:\n{self.agent_log(node)[-3000:]}")

    # -- pods ---------------------------------------------------------------------------

    def cni_conf(self, node: LabNode) -> dict:
        d = self.node_dir(node)
        return {"cniVersion": "1.0.0", "name": "tortie-lab", "type": "tortie", "mtu": 1500,
                "agent_socket": self.socket_path(node), "log_file_path": f"{d}/cni.log",
                "log_level": "debug", "state_dir": f"{d}/cni-state", "ipam": {"type": "tortie"}}

    def cni_run(self, node: LabNode | str, command: str, container_id: str, netns: str, namespace: str,
                pod: str, conf: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        node = self.lab.node(node) if isinstance(node, str) else node
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update({"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
                    "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
                    "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"})
        return subprocess.run(["ip", "netns", "exec", node.ns, *self.cni], input=json.dumps(conf or self.cni_conf(node)),
                              capture_output=True, text=True, env=env, timeout=timeout)

    def schedule_pod(self, namespace: str, name: str, node: LabNode | str, labels: dict | None = None,
                     ports: list[dict] | None = None, annotations: dict | None = None) -> None:
        """The Pod object bound to `node` (what the scheduler leaves for kubelet), no CNI ADD."""
        node = self.lab.node(node) if isinstance(node, str) else node
        meta = {"name": name, "namespace": namespace, "labels": labels or {}}
        if annotations:
            meta["annotations"] = annotations
        self.apply({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                    "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "none",
                                                                    "ports": ports or []}]}})

    def add_pod(self, namespace: str, name: str, node: LabNode | str, labels: dict | None = None,
                ports: list[dict] | None = None, annotations: dict | None = None, register: bool = True,
                serve: list[str] | None = None) -> LabPod:
        """Create the Pod object (tortiectl, unless register=False), a pod namespace, run CNI
        ADD through the real plugin and start a server on `serve` ("tcp:80", "udp:80")."""
        node = self.lab.node(node) if isinstance(node, str) else node
        if register:
            self.schedule_pod(namespace, name, node, labels, ports, annotations)
        pod_ns = self.lab.add_pod_ns(f"{namespace[:6]}-{name[:10]}")
        cid = f"c-{namespace}-{name}-{os.urandom(3).hex()}"
        p = self.cni_run(node, "ADD", cid, f"/var/run/netns/{pod_ns}", namespace, name)
        if p.returncode != 0:
            raise RuntimeError(f"CNI ADD {namespace}/{name} on {node.name} failed: {p.stdout.strip()} {p.stderr.strip()}")
        result = json.loads(p.stdout)
        ip = next((i["address"].split("/")[0] for i in result["ips"] if ":" not in i["address"]), "")
        ip6 = next((i["address"].split("/")[0] for i in result["ips"] if ":" in i["address"]), "")
        iface = next((i["name"] for i in result.get("interfaces", []) if i["name"].startswith("cali")), "")
        pod = LabPod(namespace, name, node.name, pod_ns, ip, cid, iface, result, ip6)
        self.pods[pod.key] = pod
        if serve:
            self.serve(pod, serve)
        return pod

    def del_pod(self, pod: LabPod) -> subprocess.CompletedProcess:
        p = self.cni_run(pod.node, "DEL", pod.container_id, f"/var/run/netns/{pod.ns}", pod.namespace, pod.name)
        self.pods.pop(pod.key, None)
        return p

    def serve(self, pod: LabPod, listeners: list[str]) -> subprocess.Popen:
        proc = self.lab.popen(pod.ns, [sys.executable, "-c", SERVER, *listeners],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"server in {pod.key} did not start")
        return proc

    # -- probes -------------------------------------------------------------------------

    def probe(self, src: LabPod | str, dst_ip: str, port: int, proto: str = "tcp", timeout: float = 1.0) -> bool:
        """One real connection from a pod (or any namespace name) to dst_ip:port."""
        ns = src.ns if isinstance(src, LabPod) else src
        code = ("import socket,sys\n"
                "ip,port,proto,t=sys.argv[1],int(sys.argv[2]),sys.argv[3],float(sys.argv[4])\n"
                "fam=socket.AF_INET6 if ':' in ip else socket.AF_INET\n"
                "s=socket.socket(fam, socket.SOCK_STREAM if proto=='tcp' else socket.SOCK_DGRAM)\n"
                "s.settimeout(t)\n"
                "try:\n"
                " s.connect((ip,port))\n"
                " if proto=='udp':\n  s.send(b'x'); s.recv(64)\n"
                " else:\n  s.recv(8)\n"
                "except Exception:\n sys.exit(1)\n")
        p = sh(sys.executable, "-c", code, dst_ip, str(port), proto, str(timeout), ns=ns, check=False,
               timeout=timeout + 15)
        return p.returncode == 0

    def peer_seen(self, src: LabPod | str, dst_ip: str, port: int, timeout: float = 2.0) -> str:
        """The source address a "who:<port>" server at dst_ip sees for a TCP connection
        from `src` ("" when the connection fails)."""
        ns = src.ns if isinstance(src, LabPod) else src
        code = ("import socket,sys\n"
                "ip,port,t=sys.argv[1],int(sys.argv[2]),float(sys.argv[3])\n"
                "s=socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET)\n"
                "s.settimeout(t)\n"
                "try:\n s.connect((ip,port)); print(s.recv(64).decode().strip())\n"
                "except Exception:\n sys.exit(1)\n")
        p = sh(sys.executable, "-c", code, dst_ip, str(port), str(timeout), ns=ns, check=False, timeout=timeout + 15)
        return p.stdout.strip() if p.returncode == 0 else ""

    def ping(self, src: LabPod | str, dst_ip: str) -> bool:
        ns = src.ns if isinstance(src, LabPod) else src
        return self.lab.ping(ns, dst_ip)

    def routes(self, node: LabNode | str, *selector: str) -> str:
        node = self.lab.node(node) if isinstance(node, str) else node
        return sh("ip", "route", "show", *selector, ns=node.ns).stdout


def ingress_only_from(name: str, to_app: str, from_app: str, namespace: str = "default") -> str:
    """A NetworkPolicy (YAML, for LabCluster.apply): pods labelled app=<to_app> accept
    connections only from pods labelled app=<from_app> of their namespace."""
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  podSelector: {{matchLabels: {{app: {to_app}}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from_app}}}}}}}]}}]
"""


def wait_for(pred, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
