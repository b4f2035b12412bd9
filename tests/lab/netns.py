"""The netns lab: small clusters built from network namespaces, veths and bridges.

Everything here works only inside namespaces it creates. Every name carries the lab's
per-run prefix, and Lab.teardown() (also run by the pytest fixtures when a test fails)
removes every namespace and kills every process the lab started.  Nothing touches the
root namespace's routes, iptables or sysctls: veths are created directly inside their
target namespaces with `ip link add ... netns`.

Layout (one segment):

    <prefix>-ul   underlay namespace: bridge br0 with 192.168.100.1/24 (the nodes' gateway)
    <prefix>-n1   node 1: eth0 192.168.100.11/24, default via 192.168.100.1
    <prefix>-n2   node 2: eth0 192.168.100.12/24 ...

Two subnets (two_subnets=True): bridges br0 (192.168.100.0/24) and br1 (192.168.200.0/24)
in the underlay namespace, joined by a router namespace <prefix>-rt holding .1 on both;
odd-numbered nodes go on the first subnet, even-numbered ones on the second.
"""
from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field

SUBNETS = ("192.168.100", "192.168.200")
SUBNETS6 = ("fd00:100:", "fd00:200:")  # ipv6=True: node i is fd00:100::<10+i>/64, the gateway ::1


class LabError(RuntimeError):
    pass


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 30,
       input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (inside namespace `ns` when given) and return the finished process."""
    cmd = list(argv)
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def new_prefix(base: str = "tt") -> str:
    """A per-run prefix: short enough that '<prefix>-n10' stays readable, unique per run."""
    return f"{base}{secrets.token_hex(3)}"


def list_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_namespaces(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with `prefix-`, killing what runs inside."""
    gone = []
    for ns in list_namespaces():
        if ns.startswith(prefix + "-"):
            kill_namespace_processes(ns)
            sh("ip", "netns", "del", ns, check=False)
            gone.append(ns)
    return gone


def kill_namespace_processes(ns: str) -> None:
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def create_namespace(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "link", "set", "lo", "up", ns=name)


@dataclass
class LabNode:
    name: str  # logical name, e.g. "node1"
    ns: str  # namespace name
    ip: str  # "192.168.100.11"
    prefixlen: int
    gateway: str
    subnet: int  # index into SUBNETS
    uplink: str = "eth0"
    ip6: str = ""  # "fd00:100::11" in a lab built with ipv6=True

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


@dataclass
class Lab:
    prefix: str
    nodes: list[LabNode] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    two_subnets: bool = False
    ipv6: bool = False  # nodes get IPv6 addresses on the lab bridges too (a dual-stack underlay)
    ipv4: bool = True  # False (with ipv6): IPv6-only nodes, no IPv4 address or route at all

    @property
    def underlay(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def router(self) -> str:
        return f"{self.prefix}-rt"

    # -- building ------------------------------------------------------------------

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        create_namespace(ns)
        self.namespaces.append(ns)
        return ns

    def build(self, n_nodes: int, two_subnets: bool = False, ipv6: bool = False, ipv4: bool = True) -> "Lab":
        if not (ipv4 or ipv6):
            raise LabError("a lab needs IPv4, IPv6 or both")
        self.two_subnets = two_subnets
        self.ipv6, self.ipv4 = ipv6, ipv4
        ul = self._ns("ul")
        bridges = ["br0", "br1"] if two_subnets else ["br0"]
        for br in bridges:
            sh("ip", "link", "add", br, "type", "bridge", ns=ul)
            sh("ip", "link", "set", br, "up", ns=ul)
        if two_subnets:
            rt = self._ns("rt")
            for i, br in enumerate(bridges):
                sh("ip", "link", "add", f"eth{i}", "netns", rt, "type", "veth",
                   "peer", "name", f"rt{i}", "netns", ul)
                sh("ip", "link", "set", f"rt{i}", "master", br, "up", ns=ul)
                sh("ip", "addr", "add", f"{SUBNETS[i]}.1/24", "dev", f"eth{i}", ns=rt)
                if ipv6:
                    sh("ip", "addr", "add", f"{SUBNETS6[i]}:1/64", "dev", f"eth{i}", "nodad", ns=rt)
                sh("ip", "link", "set", f"eth{i}", "up", ns=rt)
            sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=rt)
            if ipv6:
                sh("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=rt)
        else:
            # The underlay namespace itself answers as the gateway so every node has a
            # default route (proxy ARP for 169.254.1.1 answers only when one exists).
            sh("ip", "addr", "add", f"{SUBNETS[0]}.1/24", "dev", "br0", ns=ul)
            if ipv6:
                sh("ip", "addr", "add", f"{SUBNETS6[0]}:1/64", "dev", "br0", "nodad", ns=ul)
        for i in range(1, n_nodes + 1):
            self.add_node()
        return self

    def add_node(self) -> LabNode:
        i = len(self.nodes) + 1
        subnet = (i - 1) % 2 if self.two_subnets else 0
        name = f"node{i}"
        ns = self._ns(f"n{i}")
        ip = f"{SUBNETS[subnet]}.{10 + i}"
        br = f"br{subnet}"
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"n{i}", "netns", self.underlay)
        sh("ip", "link", "set", f"n{i}", "master", br, "up", ns=self.underlay)
        gw = f"{SUBNETS[subnet]}.1"
        if self.ipv4:
            sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        else:
            ip = gw = ""
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        if self.ipv4:
            sh("ip", "route", "add", "default", "via", gw, ns=ns)
        ip6 = ""
        if self.ipv6:
            # nodad: the address is usable at once (BIRD's IPv6 sessions bind to it)
            ip6 = f"{SUBNETS6[subnet]}:{10 + i}"
            sh("ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad", ns=ns)
            sh("ip", "-6", "route", "add", "default", "via", f"{SUBNETS6[subnet]}:1", ns=ns)
        # A Kubernetes node forwards; these are the node namespace's own sysctls.
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=ns)
        node = LabNode(name=name, ns=ns, ip=ip, prefixlen=24, gateway=gw, subnet=subnet, ip6=ip6)
        self.nodes.append(node)
        return node

    def add_pod_ns(self, name: str) -> str:
        """An empty pod namespace (loopback up) for the CNI plugin to wire."""
        ns = self._ns(f"p-{name}")
        self.pods.append(ns)
        return ns

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name or n.ns == name:
                return n
        raise KeyError(name)

    # -- running things ---------------------------------------------------------------

    def exec(self, ns: str, *argv: str, check: bool = True, timeout: float = 30,
             input: str | None = None) -> subprocess.CompletedProcess:
        return sh(*argv, ns=ns, check=check, timeout=timeout, input=input)

    def popen(self, ns: str | None, argv: list[str], **kw) -> subprocess.Popen:
        """Start a long-running process inside `ns` (root namespace if None); the lab
        kills it on teardown."""
        cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def forward_loopback(self, ns: str, port: int, target_port: int | None = None) -> subprocess.Popen:
        """Make 127.0.0.1:port inside `ns` reach 127.0.0.1:target_port of the root
        namespace (etcd runs there), through tests/lab/nsproxy.py."""
        here = os.path.dirname(os.path.abspath(__file__))
        argv = [os.environ.get("TORTIE_PYTHON", "python3"), os.path.join(here, "nsproxy.py"),
                "--netns", ns, "--port", str(port), "--to", str(target_port or port)]
        p = self.popen(None, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_listening(ns, port, p)
        return p

    # -- probes -------------------------------------------------------------------------

    def ping(self, ns: str, addr: str, count: int = 1, timeout: float = 2) -> bool:
        p = sh("ping", "-n", "-q", "-c", str(count), "-W", str(int(max(1, timeout))), addr,
               ns=ns, check=False, timeout=timeout * count + 5)
        return p.returncode == 0

    # -- teardown -----------------------------------------------------------------------

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        delete_namespaces(self.prefix)
        self.namespaces.clear()
        self.nodes.clear()
        self.pods.clear()

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def _wait_listening(ns: str, port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise LabError(f"nsproxy for {ns}:{port} exited: {err.strip()}")
        out = sh("ss", "-Hltn", f"sport = :{port}", ns=ns, check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise LabError(f"nsproxy for {ns}:{port} did not start listening")


def tcp_probe(lab: Lab, src_ns: str, dst: str, port: int, timeout: float = 2) -> bool:
    """A real TCP connect from inside src_ns; True when the handshake completes."""
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
            f"s.settimeout({timeout})\n"
            "try:\n s.connect((sys.argv[1], int(sys.argv[2])))\nexcept Exception:\n sys.exit(1)\n")
    p = sh("python3", "-c", code, dst, str(port), ns=src_ns, check=False, timeout=timeout + 10)
    return p.returncode == 0
