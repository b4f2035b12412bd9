"""A real Kubernetes cluster (v1.20.2, built by deploy/kube/build.sh) inside network
namespaces, with tortie as its network.

Layout, all names carrying a per-run prefix "tk<6 hex>" (P below):

    P-br   the lab bridge br0, 10.99.0.1/24 (the nodes' default gateway; routes nowhere)
    P-cp   control plane, eth0 10.99.0.2: etcd (loopback), kube-apiserver :6443,
           kube-controller-manager (node CIDR allocation from 10.244.0.0/16), kube-scheduler;
           a route to each node's podCIDR via the node (the API server's proxy reaches pods)
    P-n1.. nodes, eth0 10.99.0.11..: containerd + runc (Debian), kubelet, kube-proxy,
           tortie-agent with BIRD, the lab's cluster DNS on the node address (cluster_dns.py);
           CNI bin/conf dirs of their own

Dual-stack (KubeLab(dual_stack=True), `up --dual-stack`): the bridge, control plane and
nodes also get fd99::1, ::2, ::11.. /64; every component runs with the IPv6DualStack
feature gate (alpha in 1.20), the controller-manager allocates a podCIDR of each family
(10.244.0.0/16 by /24, fd00:244::/56 by /64), Services get a second range, kubelet reports
an InternalIP of each family, kube-proxy programs ip6tables too, and tortie's default pool
names both families.

Every process runs under `nsenter --net=/run/netns/<ns>` (not `ip netns exec`, which
remounts /sys and gives the process a private mount namespace that containerd and runc
would not share).  Files live in /var/lib/tortie-kube/P; mounts made there by kubelet and
containerd, the cgroups under /<P-node>, and the namespaces are removed by down().
Nothing in the root namespace changes: kubelet is built never to write global sysctls
(deploy/kube/build.sh), kube-proxy is told to leave conntrack and oom settings alone, and
the agent's ip_forward=1 goes into each node's own namespace.

    python -m tests.kube.cluster up [--dual-stack]  # build or reuse binaries, start, install tortie
    python -m tests.kube.cluster down [P] # remove a cluster (all tk clusters without P)
"""
from __future__ import annotations

import base64
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = "/var/lib/tortie-kube"
SUBNET = "10.99.0"
CP_IP = f"{SUBNET}.2"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
SUBNET6 = "fd99::"
CP_IP6 = f"{SUBNET6}2"
CLUSTER_CIDR6 = "fd00:244::/56"
SERVICE_CIDR6 = "fd00:96::/112"
DUAL_STACK_GATE = "--feature-gates=IPv6DualStack=true"
ADMIN_TOKEN_USER = "tortie-lab-admin"
VENV_BIN = os.path.dirname(sys.executable)


class KubeLabError(RuntimeError):
    pass


def run(argv: list[str], *, ns: str | None = None, check: bool = True, timeout: float = 120,
        input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (["nsenter", f"--net=/run/netns/{ns}"] if ns else []) + list(argv)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise KubeLabError(f"{shlex.join(cmd)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def wait_for(fn, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            v = fn()
            if v:
                return v
        except KubeLabError as e:
            if "exited" in str(e):  # a component died: waiting longer cannot help
                raise
            last = e
        except Exception as e:  # noqa: BLE001 - retried; the last one is reported
            last = e
        time.sleep(interval)
    raise KubeLabError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def build_binaries() -> str:
    """deploy/kube/build.sh: the cached bin dir (built once per Kubernetes version)."""
    p = subprocess.run(["bash", os.path.join(ROOT, "deploy/kube/build.sh")], text=True,
                       stdout=subprocess.PIPE, stderr=sys.stderr)
    if p.returncode != 0:
        raise KubeLabError(f"deploy/kube/build.sh failed ({p.returncode})")
    return p.stdout.strip().splitlines()[-1]


@dataclass
class Node:
    name: str  # also the Kubernetes node name
    ns: str
    ip: str
    dir: str
    ip6: str = ""  # dual-stack labs only

    @property
    def sock(self) -> str:
        return os.path.join(self.dir, "containerd.sock")

    @property
    def cni_bin(self) -> str:
        return os.path.join(self.dir, "opt/cni/bin")

    @property
    def cni_conf(self) -> str:
        return os.path.join(self.dir, "etc/cni/net.d")

    @property
    def agent_dir(self) -> str:
        return os.path.join(self.dir, "tortie")


@dataclass
class KubeLab:
    prefix: str = field(default_factory=lambda: f"tk{secrets.token_hex(3)}")
    n_nodes: int = 2
    bin_dir: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    dual_stack: bool = False

    # -- layout ---------------------------------------------------------------------

    @property
    def dir(self) -> str:
        return os.path.join(BASE, self.prefix)

    @property
    def br(self) -> str:
        return f"{self.prefix}-br"

    @property
    def cp(self) -> str:
        return f"{self.prefix}-cp"

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.dir, "admin.kubeconfig")

    def bin(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    @property
    def src_tree(self) -> str:
        # bin_dir is <cache>/<version>/bin; the tree is <cache>/<version>/gopath/src/k8s.io/kubernetes
        return os.path.join(os.path.dirname(self.bin_dir), "gopath/src/k8s.io/kubernetes")

    @classmethod
    def attach(cls, prefix: str) -> "KubeLab":
        """The KubeLab of a running cluster (`make kube-up`), from its lab.json."""
        with open(os.path.join(BASE, prefix, "lab.json")) as f:
            d = json.load(f)
        return cls(prefix=prefix, n_nodes=len(d["nodes"]), bin_dir=d["bin_dir"],
                   nodes=[Node(**n) for n in d["nodes"]], dual_stack=d.get("dual_stack", False))

    def tokens_admin(self) -> str:
        with open(os.path.join(self.dir, "pki/tokens.csv")) as f:
            return next(line.split(",")[0] for line in f if f",{ADMIN_TOKEN_USER}," in line)

    # -- helpers --------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120,
                kubeconfig: str | None = None) -> subprocess.CompletedProcess:
        return run([self.bin("kubectl"), "--kubeconfig", kubeconfig or self.kubeconfig, *args],
                   ns=self.cp, check=check, input=input, timeout=timeout)

    def kjson(self, *args: str):
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def popen(self, name: str, ns: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        log = open(os.path.join(self.dir, "logs", f"{name}.log"), "ab")
        p = subprocess.Popen([*self.enter(ns), *argv], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = p
        with open(os.path.join(self.dir, "pids"), "a") as f:
            f.write(f"{p.pid} {name}\n")
        return p

    def enter(self, ns: str) -> list[str]:
        """The command prefix that runs a lab process in namespace `ns`."""
        return ["nsenter", f"--net=/run/netns/{ns}"]

    def stop(self, name: str, timeout: float = 10) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, "logs", f"{name}.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _check_alive(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            raise KubeLabError(f"{name} exited ({p.returncode}); its log ends:\n{self.log(name)[-3000:]}")

    # -- network --------------------------------------------------------------------

    def _netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        run(["ip", "link", "set", "lo", "up"], ns=name)

    def _plug(self, ns: str, ip: str, idx: int, ip6: str = "") -> None:
        host = f"{self.prefix}h{idx}"
        run(["ip", "link", "add", host, "netns", self.br, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", host, "master", "br0", "up"], ns=self.br)
        run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], ns=ns)
        if ip6:  # nodad: usable at once (duplicate detection would hold it for a second)
            run(["ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"], ns=ns)
        run(["ip", "link", "set", "eth0", "up"], ns=ns)
        run(["ip", "route", "add", "default", "via", f"{SUBNET}.1"], ns=ns)
        if ip6:
            run(["ip", "-6", "route", "add", "default", "via", f"{SUBNET6}1"], ns=ns)

    def build_network(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self._netns(self.br)
        run(["ip", "link", "add", "br0", "type", "bridge"], ns=self.br)
        run(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0"], ns=self.br)
        if self.dual_stack:
            run(["ip", "addr", "add", f"{SUBNET6}1/64", "dev", "br0", "nodad"], ns=self.br)
        run(["ip", "link", "set", "br0", "up"], ns=self.br)
        self._netns(self.cp)
        self._plug(self.cp, CP_IP, 0, CP_IP6 if self.dual_stack else "")
        for i in range(1, self.n_nodes + 1):
            n = Node(f"{self.prefix}-n{i}", f"{self.prefix}-n{i}", f"{SUBNET}.{10 + i}",
                     os.path.join(self.dir, f"n{i}"), f"{SUBNET6}{10 + i}" if self.dual_stack else "")
            self._netns(n.ns)
            self._plug(n.ns, n.ip, i, n.ip6)
            self.nodes.append(n)

    # -- PKI and credentials ----------------------------------------------------------

    def make_pki(self) -> None:
        d = os.path.join(self.dir, "pki")
        os.makedirs(d, exist_ok=True)

        def ossl(*a):
            run(["openssl", *a])
        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt",
             "-days", "30", "-subj", "/CN=tortie-lab-ca")
        ext = f"{d}/apiserver.ext"
        with open(ext, "w") as f:
            f.write(f"subjectAltName=IP:{CP_IP},IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,"
                    "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
                    "extendedKeyUsage=serverAuth\n")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/apiserver.key", "-out", f"{d}/apiserver.csr",
             "-subj", "/CN=kube-apiserver")
        ossl("x509", "-req", "-in", f"{d}/apiserver.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
             "-CAcreateserial", "-out", f"{d}/apiserver.crt", "-days", "30", "-extfile", ext)
        ossl("genrsa", "-out", f"{d}/sa.key", "2048")
        ossl("rsa", "-in", f"{d}/sa.key", "-pubout", "-out", f"{d}/sa.pub")
        # static tokens: lab credentials for the admin and each component (RBAC still applies)
        self.tokens = {"admin": secrets.token_hex(16), "controller-manager": secrets.token_hex(16),
                       "scheduler": secrets.token_hex(16), "kube-proxy": secrets.token_hex(16)}
        for n in self.nodes:
            self.tokens[n.name] = secrets.token_hex(16)
        lines = [f'{self.tokens["admin"]},{ADMIN_TOKEN_USER},1,"system:masters"',
                 f'{self.tokens["controller-manager"]},system:kube-controller-manager,2',
                 f'{self.tokens["scheduler"]},system:kube-scheduler,3',
                 f'{self.tokens["kube-proxy"]},system:kube-proxy,4']
        lines += [f'{self.tokens[n.name]},system:node:{n.name},{10 + i},"system:nodes"'
                  for i, n in enumerate(self.nodes)]
        with open(f"{d}/tokens.csv", "w") as f:
            f.write("\n".join(lines) + "\n")
        self.write_kubeconfig(self.kubeconfig, self.tokens["admin"])
        for who in ("controller-manager", "scheduler", "kube-proxy"):
            self.write_kubeconfig(os.path.join(self.dir, f"{who}.kubeconfig"), self.tokens[who])
        for n in self.nodes:
            os.makedirs(n.dir, exist_ok=True)
            self.write_kubeconfig(os.path.join(n.dir, "kubelet.kubeconfig"), self.tokens[n.name])

    def write_kubeconfig(self, path: str, token: str) -> str:
        with open(os.path.join(self.dir, "pki/ca.crt"), "rb") as f:
            ca = base64.b64encode(f.read()).decode()
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "lab",
               "clusters": [{"name": "lab", "cluster": {"server": f"https://{CP_IP}:6443",
                                                        "certificate-authority-data": ca}}],
               "users": [{"name": "u", "user": {"token": token}}],
               "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "u"}}]}
        with open(path, "w") as f:
            json.dump(cfg, f)
        os.chmod(path, 0o600)
        return path

    # -- control plane ----------------------------------------------------------------

    @property
    def gates(self) -> tuple[str, ...]:
        return (DUAL_STACK_GATE,) if self.dual_stack else ()

    @property
    def cluster_cidrs(self) -> str:
        return f"{CLUSTER_CIDR},{CLUSTER_CIDR6}" if self.dual_stack else CLUSTER_CIDR

    @property
    def service_cidrs(self) -> str:
        return f"{SERVICE_CIDR},{SERVICE_CIDR6}" if self.dual_stack else SERVICE_CIDR

    @property
    def node_cidr_masks(self) -> tuple[str, ...]:
        # dual-stack refuses the single-family flag
        return (("--node-cidr-mask-size-ipv4=24", "--node-cidr-mask-size-ipv6=64") if self.dual_stack
                else ("--node-cidr-mask-size=24",))

    def start_control_plane(self) -> None:
        d, pki = self.dir, os.path.join(self.dir, "pki")
        self.popen("etcd", self.cp, ["etcd", "--name", "cp", "--data-dir", f"{d}/etcd",
                                     "--listen-client-urls", "http://127.0.0.1:2379",
                                     "--advertise-client-urls", "http://127.0.0.1:2379",
                                     "--listen-peer-urls", "http://127.0.0.1:2380",
                                     "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                                     "--initial-cluster", "cp=http://127.0.0.1:2380",
                                     "--unsafe-no-fsync"])
        self.popen("kube-apiserver", self.cp, [
            self.bin("kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            f"--bind-address={CP_IP}", f"--advertise-address={CP_IP}", "--secure-port=6443",
            "--insecure-port=0", f"--service-cluster-ip-range={self.service_cidrs}", *self.gates,
            f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt", f"--token-auth-file={pki}/tokens.csv",
            f"--service-account-key-file={pki}/sa.pub", f"--service-account-signing-key-file={pki}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", "--profiling=false", "--v=1",
            # exec/logs dial the kubelet by address: node names resolve nowhere here
            "--kubelet-preferred-address-types=InternalIP"])
        wait_for(lambda: (self._check_alive("kube-apiserver") or True)
                 and self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
                 90, "kube-apiserver /readyz")
        self.popen("kube-controller-manager", self.cp, [
            self.bin("kube-controller-manager"), f"--kubeconfig={d}/controller-manager.kubeconfig",
            f"--authentication-kubeconfig={d}/controller-manager.kubeconfig",
            f"--authorization-kubeconfig={d}/controller-manager.kubeconfig",
            "--bind-address=127.0.0.1", "--secure-port=10257", "--port=0",
            "--allocate-node-cidrs=true", f"--cluster-cidr={self.cluster_cidrs}", *self.node_cidr_masks, *self.gates,
            f"--service-cluster-ip-range={self.service_cidrs}", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki}/sa.key", f"--root-ca-file={pki}/ca.crt",
            "--controllers=*,-cloud-node-lifecycle", "--leader-elect=false", "--v=1"])
        self.popen("kube-scheduler", self.cp, [
            self.bin("kube-scheduler"), f"--kubeconfig={d}/scheduler.kubeconfig",
            f"--authentication-kubeconfig={d}/scheduler.kubeconfig",
            f"--authorization-kubeconfig={d}/scheduler.kubeconfig",
            "--bind-address=127.0.0.1", "--secure-port=10259", "--port=0", "--leader-elect=false", "--v=1"])
        # the default ServiceAccount appears once the controller-manager runs
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                 60, "the default ServiceAccount (controller-manager running)")

    # -- nodes ------------------------------------------------------------------------

    def _containerd_config(self, n: Node) -> str:
        return f"""version = 2
root = "{n.dir}/containerd/root"
state = "{n.dir}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{n.sock}"
[ttrpc]
  address = "{n.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{n.dir}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  # this machine refuses lower oom_score_adj values: without this every sandbox fails
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{n.cni_bin}"
    conf_dir = "{n.cni_conf}"
"""

    def _kubelet_config(self, n: Node) -> str:
        return json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "address": n.ip, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{n.ns}", "failSwapOn": False,
            "oomScoreAdj": 0, "protectKernelDefaults": False, "serializeImagePulls": False,
            "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf",
            # the lab's cluster DNS (tests/kube/cluster_dns.py) on the node's own address
            "clusterDNS": [n.ip],
            # the disk is shared with the host: do not evict over its usage
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        })

    def make_cgroup_root(self, n: Node) -> None:
        """kubelet --cgroup-root=/<node ns> must exist in every hierarchy; teardown removes it."""
        for ctrl in glob.glob("/sys/fs/cgroup/*"):
            if not os.path.isdir(ctrl) or os.path.ismount(ctrl) is False:
                continue
            d = os.path.join(ctrl, n.ns)
            os.makedirs(d, exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset admits no task
                if os.path.exists(os.path.join(ctrl, f)):
                    with open(os.path.join(ctrl, f)) as src, open(os.path.join(d, f), "w") as dst:
                        dst.write(src.read())

    def start_node(self, n: Node, images: list[str]) -> None:
        self.make_cgroup_root(n)
        for sub in ("containerd", n.cni_bin, n.cni_conf, "kubelet", n.agent_dir):
            os.makedirs(os.path.join(n.dir, sub), exist_ok=True)
        conf = os.path.join(n.dir, "containerd.toml")
        with open(conf, "w") as f:
            f.write(self._containerd_config(n))
        # the runtime's own helpers next to the CNI plugins: lo for every sandbox, portmap
        # for the conflist's chained hostPort plugin
        for plugin in ("loopback", "portmap"):
            shutil.copy2(f"/usr/lib/cni/{plugin}", os.path.join(n.cni_bin, plugin))
        # containerd (and so every shim and hostNetwork container) in a UTS namespace of its
        # own named for the node: a hostNetwork pod's hostname is its node's, as on a real
        # machine (the specs tell endpoints apart by it), and the host's name stays as it is
        self.popen(f"containerd-{n.name}", n.ns, ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                                                   n.name, "containerd", "--config", conf])
        wait_for(lambda: (self._check_alive(f"containerd-{n.name}") or True) and os.path.exists(n.sock),
                 30, f"containerd on {n.name}")
        for img in images:
            run(["ctr", "--address", n.sock, "-n", "k8s.io", "images", "import", "--no-unpack", img])
        kcfg = os.path.join(n.dir, "kubelet.json")
        with open(kcfg, "w") as f:
            f.write(self._kubelet_config(n))
        self.popen(f"kubelet-{n.name}", n.ns, [
            self.bin("kubelet"), f"--config={kcfg}", f"--kubeconfig={n.dir}/kubelet.kubeconfig",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{n.sock}",
            f"--root-dir={n.dir}/kubelet", f"--cert-dir={n.dir}/kubelet/pki",
            f"--volume-plugin-dir={n.dir}/kubelet/volume-plugins",
            f"--hostname-override={n.name}", f"--node-ip={n.ip}" + (f",{n.ip6}" if n.ip6 else ""), *self.gates,
            "--pod-infra-container-image=k8s.gcr.io/pause:3.2", "--v=1"])

    def start_cluster_dns(self, n: Node) -> None:
        """tests/kube/cluster_dns.py (a stand-in for CoreDNS) on the node's address."""
        self.popen(f"cluster-dns-{n.name}", n.ns, [sys.executable, "-m", "tests.kube.cluster_dns",
                                                   f"--kubeconfig={self.kubeconfig}", f"--listen={n.ip}"],
                   env={"PYTHONPATH": ROOT})

    def start_kube_proxy(self, n: Node) -> None:
        # 0 for the conntrack and oom settings: kube-proxy leaves the global values alone
        self.popen(f"kube-proxy-{n.name}", n.ns, [
            self.bin("kube-proxy"), f"--kubeconfig={self.dir}/kube-proxy.kubeconfig",
            f"--hostname-override={n.name}", f"--cluster-cidr={self.cluster_cidrs}", "--proxy-mode=iptables", *self.gates,
            "--conntrack-max-per-core=0", "--conntrack-min=0",
            "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
            "--oom-score-adj=0", f"--bind-address={n.ip}", "--metrics-bind-address=127.0.0.1:10249",
            "--healthz-bind-address=127.0.0.1:10256", "--v=1"])

    # -- tortie -----------------------------------------------------------------------

    def manifest_docs(self) -> list[dict]:
        """manifests/tortie.yaml as objects."""
        import yaml  # PyYAML comes with the kubernetes client the agent depends on
        with open(os.path.join(ROOT, "manifests/tortie.yaml")) as f:
            return [d for d in yaml.safe_load_all(f) if d]

    def install_tortie(self, pool_mode: str | None = None) -> None:
        """tortie the way manifests/tortie.yaml installs it, minus the container image:
        the Namespace, RBAC and ConfigMap applied from the manifest; per node the CNI binary
        and the ConfigMap's conflist through deploy/install-cni.sh into the node's CNI dirs,
        and the agent in kubernetes mode with the ConfigMap's agent.yaml and the
        ServiceAccount token.  (A branch with the image swaps this for applying the
        DaemonSet.)  Nodes share one filesystem here, so each node's socket, state and log
        paths are made its own; `pool_mode` overrides default_pool_mode (bgp, vxlan...)."""
        docs = [d for d in self.manifest_docs() if d["kind"] != "DaemonSet"]
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        cm = self.kjson("-n", "tortie-system", "get", "configmap", "tortie-config")["data"]
        token = self.service_account_token("tortie-system", "tortie-agent")
        agent_kubeconfig = self.write_kubeconfig(os.path.join(self.dir, "tortie-agent.kubeconfig"), token)
        cni = os.path.join(ROOT, "dist", "tortie")
        if not os.path.exists(cni):
            run(["make", "-C", ROOT, "cni-binary"], timeout=900)
        bundle = os.path.dirname(os.path.realpath(cni))
        for n in self.nodes:
            self.install_tortie_node(n, cm, agent_kubeconfig, bundle, pool_mode)

    def install_tortie_node(self, n: Node, cm: dict, agent_kubeconfig: str, bundle: str,
                            pool_mode: str | None) -> None:
        conflist = json.loads(cm["10-tortie.conflist"])
        conflist["plugins"][0]["agent_socket"] = os.path.join(n.agent_dir, "agent.sock")
        conflist["plugins"][0]["log_file_path"] = os.path.join(n.agent_dir, "cni.log")
        agent_yaml = os.path.join(n.agent_dir, "agent.yaml")
        with open(agent_yaml, "w") as f:
            f.write(cm["agent.yaml"])
        root = n.dir  # HOST_ROOT: install-cni.sh writes <root>/opt/cni/bin and <root>/etc/cni/net.d
        run(["sh", os.path.join(ROOT, "deploy/install-cni.sh")],
            env={"HOST_ROOT": root, "CNI_BIN_SRC": bundle, "CNI_CONFLIST": json.dumps(conflist, indent=2)})
        env = {"TORTIE_CONFIG": agent_yaml, "TORTIE_NODE_NAME": n.name, "TORTIE_KUBECONFIG": agent_kubeconfig,
               "TORTIE_SOCKET_PATH": os.path.join(n.agent_dir, "agent.sock"),
               "TORTIE_STATE_DIR": os.path.join(n.agent_dir, "state"),
               "TORTIE_RUN_DIR": os.path.join(n.agent_dir, "run")}
        if pool_mode:
            env["TORTIE_DEFAULT_POOL_MODE"] = pool_mode
        if self.dual_stack:  # the pools the podCIDRs come from, both families
            env["TORTIE_DEFAULT_POOL"] = self.cluster_cidrs
        self.popen(f"tortie-agent-{n.name}", n.ns, [os.path.join(VENV_BIN, "tortie-agent")], env=env)

    def stop_tortie(self) -> None:
        for n in self.nodes:
            self.stop(f"tortie-agent-{n.name}")

    def service_account_token(self, namespace: str, sa: str) -> str:
        def secret():
            s = self.kjson("-n", namespace, "get", "serviceaccount", sa).get("secrets") or []
            return s and s[0]["name"]
        name = wait_for(secret, 60, f"the token Secret of {namespace}/{sa}")
        data = self.kjson("-n", namespace, "get", "secret", name)["data"]["token"]
        return base64.b64decode(data).decode()

    def agent_status(self, n: Node) -> dict:
        p = run(["python3", "-c", "import urllib.request,sys;"
                 "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9099/status',timeout=3).read().decode())"],
                ns=n.ns, check=False, timeout=10)
        return json.loads(p.stdout) if p.returncode == 0 else {}

    def wait_agents_ready(self, timeout: float = 90) -> None:
        for n in self.nodes:
            wait_for(lambda n=n: (self._check_alive(f"tortie-agent-{n.name}") or True)
                     and self.agent_status(n).get("ready"), timeout, f"tortie-agent on {n.name} ready")

    def wait_nodes_ready(self, timeout: float = 180) -> None:
        def ready():
            for n in self.nodes:
                self._check_alive(f"kubelet-{n.name}")
            items = self.kjson("get", "nodes")["items"]
            ok = {i["metadata"]["name"] for i in items
                  if any(c["type"] == "Ready" and c["status"] == "True" for c in i["status"]["conditions"])}
            return ok >= {n.name for n in self.nodes}
        wait_for(ready, timeout, "every node Ready", interval=1)

    def route_pods_from_control_plane(self) -> None:
        """The API server reaches pods (its proxy, webhooks), as a control plane on a node
        that runs the network would: each node's podCIDR (tortie's block there) via that
        node, in the control-plane namespace only."""
        for item in self.kjson("get", "nodes")["items"]:
            ips = [a["address"] for a in item["status"]["addresses"] if a["type"] == "InternalIP"]
            for cidr in item["spec"].get("podCIDRs") or []:
                v6 = ":" in cidr
                ip = next((i for i in ips if (":" in i) == v6), None)
                if ip:
                    run(["ip", "-6" if v6 else "-4", "route", "replace", cidr, "via", ip], ns=self.cp)

    # -- whole cluster ------------------------------------------------------------------

    def up(self, with_tortie: bool = True, pool_mode: str | None = None) -> "KubeLab":
        from tests.kube import images
        if not self.bin_dir:
            self.bin_dir = build_binaries()
        archives = images.build_all(self.bin_dir, self.src_tree, os.path.join(os.path.dirname(self.bin_dir), "images"))
        self.build_network()
        with open(os.path.join(self.dir, "lab.json"), "w") as f:
            json.dump({"prefix": self.prefix, "bin_dir": self.bin_dir, "dual_stack": self.dual_stack,
                       "nodes": [n.__dict__ for n in self.nodes]}, f)
        self.make_pki()
        self.start_control_plane()
        for n in self.nodes:
            self.start_node(n, archives)
            self.start_kube_proxy(n)
            self.start_cluster_dns(n)
        if with_tortie:
            self.install_tortie(pool_mode)
            self.wait_agents_ready()
        self.wait_nodes_ready()
        self.route_pods_from_control_plane()
        return self

    def down(self) -> None:
        teardown(self.prefix, self.procs)

    def up_or_remove(self, what: str, **up_args) -> "KubeLab":
        """up(); on any failure say where the logs are and remove the half-made cluster."""
        try:
            self.up(**up_args)
        except BaseException:
            print(f"{what} failed; logs in {self.dir}/logs (removing the cluster)", file=sys.stderr)
            self.down()
            raise
        return self


# -- teardown (also for a cluster left by a crashed run) -----------------------------------

def _pids_in_ns(ns: str) -> list[int]:
    p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _cgroup_dirs(prefix: str) -> list[str]:
    out = []
    for ctrl in glob.glob("/sys/fs/cgroup/*"):
        out += glob.glob(os.path.join(ctrl, f"{prefix}-n*"))
    return out


def _kill_cgroups(prefix: str) -> None:
    for top in _cgroup_dirs(prefix):
        for dirpath, _, _ in os.walk(top):
            for pid in _read_pids(os.path.join(dirpath, "cgroup.procs")):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _rm_cgroups(prefix: str) -> list[str]:
    left = []
    for top in _cgroup_dirs(prefix):
        dirs = [d for d, _, _ in os.walk(top)]
        for d in sorted(dirs, key=len, reverse=True):
            for _ in range(20):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                left.append(d)
    return left


def mounts_under(path: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    return out


def teardown(prefix: str, procs: dict | None = None) -> None:
    d = os.path.join(BASE, prefix)
    # pod logs the kubelets wrote to the fixed /var/log/pods: only this cluster's pods
    uids = {os.path.basename(p) for p in glob.glob(os.path.join(d, "n*/kubelet/pods/*"))}
    # our own processes first (started by this run or listed in the pids file), then
    # anything left in the namespaces (shims) and the pods' cgroups (containers)
    pids = [p.pid for p in (procs or {}).values()]
    try:
        with open(os.path.join(d, "pids")) as f:
            pids += [int(line.split()[0]) for line in f if line.strip()]
    except OSError:
        pass
    for pid in set(pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    time.sleep(1)
    namespaces = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                  if ns.startswith(f"{prefix}-")]
    for _ in range(3):
        for ns in namespaces:
            for pid in _pids_in_ns(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _kill_cgroups(prefix)
        time.sleep(0.5)
    for p in (procs or {}).values():
        try:
            p.wait(5)
        except Exception:  # noqa: BLE001
            pass
    for mp in sorted(mounts_under(d), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    _rm_cgroups(prefix)
    for uid in uids:
        for p in glob.glob(f"/var/log/pods/*_{uid}"):
            shutil.rmtree(p, ignore_errors=True)
    for link in glob.glob("/var/log/containers/*.log"):
        if os.path.islink(link) and not os.path.exists(link):
            target = os.readlink(link)
            if any(u in target for u in uids):
                os.unlink(link)
    if not mounts_under(d):
        shutil.rmtree(d, ignore_errors=True)


def leftovers(prefix: str) -> list[str]:
    """What of a cluster still exists after teardown (empty when all is gone)."""
    out = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
           if ns.startswith(f"{prefix}-")]
    out += mounts_under(os.path.join(BASE, prefix))
    out += _cgroup_dirs(prefix)
    if os.path.exists(os.path.join(BASE, prefix)):
        out.append(os.path.join(BASE, prefix))
    return out


def _main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "up"
    if cmd == "up":
        lab = KubeLab(dual_stack="--dual-stack" in argv[1:]).up_or_remove("kube-up")
        kc = lab.kubeconfig
        print(f"""
cluster {lab.prefix} is up: control plane in netns {lab.cp}, nodes {', '.join(n.ns for n in lab.nodes)}
  kubectl (from the control-plane namespace; the root namespace has no route to the lab):
    nsenter --net=/run/netns/{lab.cp} {lab.bin('kubectl')} --kubeconfig {kc} get nodes -o wide
  a node's shell (its containerd: ctr --address {lab.nodes[0].sock} -n k8s.io containers ls):
    nsenter --net=/run/netns/{lab.nodes[0].ns} bash
  logs: {lab.dir}/logs        remove it: make kube-down""")
        return 0
    if cmd == "down":
        prefixes = argv[1:] or sorted(os.listdir(BASE)) if os.path.isdir(BASE) else argv[1:]
        for p in prefixes:
            if p.startswith("tk"):
                teardown(p)
                left = leftovers(p)
                print(f"kube-down: {p} removed" + (f"; LEFT: {left}" if left else ""))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
