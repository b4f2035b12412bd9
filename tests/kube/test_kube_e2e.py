"""tortie under a real Kubernetes (v1.20.2: kube-apiserver, controller-manager, scheduler,
kubelets on containerd + runc, kube-proxy) in network namespaces: `make e2e`.

The cluster is built once per session (tests/kube/cluster.py); tortie is installed the way
manifests/tortie.yaml does it.  Every pod here is created with kubectl and wired by the
real kubelet -> containerd -> CNI path."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.kube.cluster import KubeLab, leftovers, run, wait_for
from tests.kube import images, upstream

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="the kube lab needs root (network namespaces)"),
              pytest.mark.timeout(900)]  # the first test also brings the cluster up

ROOT_SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward", "kernel.hostname",
                "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.forwarding",
                "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "vm.panic_on_oom")


def root_state() -> dict:
    """The root namespace's sysctls and rulesets (counters stripped), to compare around the run."""
    st = {k: run(["sysctl", "-n", k], check=False).stdout.strip() for k in ROOT_SYSCTLS}
    for cmd in (["iptables-legacy-save"], ["iptables-nft-save"], ["nft", "list", "ruleset"],
                ["ip", "route", "show", "table", "all"], ["ip", "rule"]):
        out = run(cmd, check=False).stdout
        out = re.sub(r"\[\d+:\d+\]", "", out)
        st[" ".join(cmd)] = "\n".join(l for l in out.splitlines() if not l.startswith("#"))
    return st


@pytest.fixture(scope="session")
def root_before():
    return root_state()


def up_and_clean(k: KubeLab, root_before: dict):
    """A fixture's body: `k` up for the tests, then down, leaving nothing and the root
    namespace as it was."""
    try:
        k.up()
        yield k
    finally:
        k.down()
    assert leftovers(k.prefix) == []
    after = root_state()
    changed = {key: (root_before[key], after[key]) for key in root_before if root_before[key] != after[key]}
    assert not changed, f"the root namespace changed: {changed}"


@pytest.fixture(scope="session")
def lab(root_before):
    yield from up_and_clean(KubeLab(**({"prefix": os.environ["KUBE_LAB_PREFIX"]}
                                       if os.environ.get("KUBE_LAB_PREFIX") else {})), root_before)


def pod(lab: KubeLab, name: str, node: str, labels: dict | None = None, ns: str = "default") -> dict:
    spec = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": images.AGNHOST, "args": ["netexec", "--http-port=8080"],
                                     "ports": [{"containerPort": 8080}]}]}}
    lab.kubectl("apply", "-f", "-", input=json.dumps(spec))
    lab.kubectl("-n", ns, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=90s", timeout=120)
    return lab.kjson("-n", ns, "get", "pod", name)


def connects(lab: KubeLab, src: str, ip: str, port: int = 8080, ns: str = "default") -> bool:
    p = lab.kubectl("-n", ns, "exec", src, "--", "/agnhost", "connect", f"{ip}:{port}", "--timeout=2s",
                    check=False, timeout=30)
    return p.returncode == 0


def node_of(lab: KubeLab, name: str):
    return next(n for n in lab.nodes if n.name == name)


def test_nodes_ready_with_pod_cidrs(lab):
    nodes = lab.kjson("get", "nodes")["items"]
    assert len(nodes) == 2
    for n in nodes:
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]), n["status"]
        assert n["spec"]["podCIDR"].startswith("10.244.")
    assert json.loads(lab.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"] == "v1.20.2"


def test_agents_in_kubernetes_mode_forward_and_know_their_subnet(lab):
    for n in lab.nodes:
        st = lab.agent_status(n)
        assert st["datastore"] == "kubernetes" and st["ready"], st
        # the fix: forwarding on in the node's own namespace (a fresh one starts with 0)
        assert run(["sysctl", "-n", "net.ipv4.ip_forward"], ns=n.ns).stdout.strip() == "1"
        # the node-prefix fix: a peer on the lab bridge is on this node's subnet (InternalIP
        # as a /32 made every peer "another subnet" and BIRD's kernel export reject all)
        assert "another subnet" not in lab.log(f"tortie-agent-{n.name}")
        with open(os.path.join(n.agent_dir, "run", "bird", "bird.conf")) as f:
            assert "if gw ~ 10.99.0.0/24 then accept;" in f.read()


def _wired(lab, p: dict) -> tuple[str, object]:
    ip = p["status"]["podIP"]
    n = node_of(lab, p["spec"]["nodeName"])
    routes = run(["ip", "-o", "route", "show", f"{ip}/32"], ns=n.ns).stdout
    return ip, n, routes


def switch_pool_mode(lab: KubeLab, mode: str) -> None:
    """Restart the agents with another default_pool_mode (what editing the ConfigMap and
    rolling the DaemonSet does)."""
    lab.stop_tortie()
    cm = lab.kjson("-n", "tortie-system", "get", "configmap", "tortie-config")["data"]
    kc = lab.write_kubeconfig(os.path.join(lab.dir, "tortie-agent.kubeconfig"),
                              lab.service_account_token("tortie-system", "tortie-agent"))
    bundle = os.path.dirname(os.path.realpath(os.path.join(os.path.dirname(__file__), "../../dist/tortie")))
    for n in lab.nodes:
        lab.install_tortie_node(n, cm, kc, bundle, mode)
    lab.wait_agents_ready()


# the manifests' default (bgp) first, then vxlan, then back: each switch must leave
# nothing of the other mode behind (BIRD's routes, the vxlan device)
@pytest.mark.parametrize("mode", ["bgp", "vxlan", "bgp-again"])
def test_pods_reach_each_other_across_nodes(lab, mode):
    if mode != "bgp":
        switch_pool_mode(lab, mode.split("-")[0])
    a = pod(lab, f"{mode}-a", lab.nodes[0].name)
    b = pod(lab, f"{mode}-b", lab.nodes[1].name)
    remote_of = lambda: run(["ip", "-o", "route", "show", "match", b["status"]["podIP"]], ns=lab.nodes[0].ns).stdout
    # BIRD learns the peer's block within a few seconds of the sessions coming up
    wait_for(lambda: "10.244." in remote_of(), 30, f"{mode}: a route to {b['status']['podIP']} on {lab.nodes[0].name}")
    for p in (a, b):
        ip, n, routes = _wired(lab, p)
        cidr = lab.kjson("get", "node", n.name)["spec"]["podCIDR"]
        assert ip.startswith(cidr.rsplit(".", 2)[0] + "."), (ip, cidr)
        assert "dev cali" in routes, routes  # tortie's veth and /32 host route
    ip_b, nb, _ = _wired(lab, b)
    na = lab.nodes[0]
    remote = run(["ip", "-o", "route", "show", "match", ip_b], ns=na.ns).stdout
    if mode.startswith("bgp"):
        assert "vxlan.calico" not in run(["ip", "-o", "link"], ns=na.ns).stdout
        assert "proto bird" in remote and f"via {nb.ip} dev eth0" in remote, remote
    else:
        assert "dev vxlan.calico" in remote and "proto bird" not in remote, remote
    assert wait_for(lambda: connects(lab, a["metadata"]["name"], ip_b), 20, f"{mode}: a -> b across nodes")
    assert wait_for(lambda: connects(lab, b["metadata"]["name"], a["status"]["podIP"]), 20, f"{mode}: b -> a")
    for p in (a, b):
        lab.kubectl("delete", "pod", p["metadata"]["name"], "--wait=true", "--timeout=60s")


def server_from_client(ns: str) -> dict:
    """A NetworkPolicy: app=server in `ns` takes TCP 8080 from app=client of `ns` only."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "server-from-client", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"port": 8080, "protocol": "TCP"}]}]}}


def test_network_policy_enforced_across_nodes(lab):
    lab.kubectl("create", "namespace", "np")
    server = pod(lab, "server", lab.nodes[0].name, {"app": "server"}, ns="np")
    allowed = pod(lab, "allowed", lab.nodes[1].name, {"app": "client"}, ns="np")
    other = pod(lab, "other", lab.nodes[1].name, {"app": "other"}, ns="np")
    ip = server["status"]["podIP"]
    assert connects(lab, "allowed", ip, ns="np") and connects(lab, "other", ip, ns="np")
    lab.kubectl("apply", "-f", "-", input=json.dumps(server_from_client("np")))
    assert wait_for(lambda: not connects(lab, "other", ip, ns="np"), 20, "policy blocks app=other")
    assert connects(lab, "allowed", ip, ns="np"), "app=client must still reach the server"
    lab.kubectl("-n", "np", "label", "pod", "other", "app=client", "--overwrite")
    assert wait_for(lambda: connects(lab, "other", ip, ns="np"), 20, "a relabelled pod is admitted")
    lab.kubectl("delete", "namespace", "np", "--wait=true", "--timeout=90s", timeout=120)


def test_cluster_network_policy_enforced_across_nodes(lab):
    """The CRDs of manifests/network-policy-api.yaml installed after the agents started (they
    look again every 30 s), then an Admin ClusterNetworkPolicy applied with kubectl denies a
    pod on the other node whatever NetworkPolicy says, and deleting it lets it in again.
    --validate=false: kubectl 1.20 does not know the CRD schema's x-kubernetes-validations
    (CEL, Kubernetes 1.25+), which this API server ignores."""
    crds = os.path.join(os.path.dirname(__file__), "../..", "manifests/network-policy-api.yaml")
    lab.kubectl("apply", "--validate=false", "-f", crds)
    try:
        lab.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/clusternetworkpolicies.policy.networking.k8s.io", timeout=90)
        lab.kubectl("create", "namespace", "cnp")
        server = pod(lab, "server", lab.nodes[0].name, {"app": "server"}, ns="cnp")
        client = pod(lab, "client", lab.nodes[1].name, {"app": "client"}, ns="cnp")
        ip = server["status"]["podIP"]
        allow_all = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "allow-all", "namespace": "cnp"},
                     "spec": {"podSelector": {}, "ingress": [{}]}}
        lab.kubectl("apply", "-f", "-", input=json.dumps(allow_all))
        assert wait_for(lambda: connects(lab, "client", ip, ns="cnp"), 20, "client -> server before the CNP")
        cnp = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
               "metadata": {"name": "deny-client"},
               "spec": {"tier": "Admin", "priority": 5,
                        "subject": {"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cnp"}},
                                             "podSelector": {"matchLabels": {"app": "server"}}}},
                        "ingress": [{"name": "no-clients", "action": "Deny",
                                     "from": [{"pods": {"namespaceSelector": {},
                                                        "podSelector": {"matchLabels": {"app": "client"}}}}]}]}}
        lab.kubectl("apply", "-f", "-", input=json.dumps(cnp))
        assert lab.kjson("get", "cnp", "deny-client")["spec"]["tier"] == "Admin"
        # within the agents' next look for the CRD (30 s) and a pass
        assert wait_for(lambda: not connects(lab, "client", ip, ns="cnp"), 90,
                        "the Admin Deny overrides the NetworkPolicy allow-all across nodes")
        lab.kubectl("delete", "cnp", "deny-client")
        assert wait_for(lambda: connects(lab, "client", ip, ns="cnp"), 30, "deleting the CNP lets the client in")
        assert client["status"]["podIP"]
    finally:
        lab.kubectl("delete", "namespace", "cnp", "--wait=true", "--timeout=90s", timeout=120, check=False)
        lab.kubectl("delete", "--ignore-not-found", "-f", crds, timeout=120, check=False)


def test_cluster_ip_service_through_kube_proxy_across_nodes(lab):
    """A ClusterIP Service: kube-proxy's DNAT in the client's node namespace, then tortie's
    routes to the backend on the other node; by address and by name (the lab's cluster DNS)."""
    server = pod(lab, "svc-backend", lab.nodes[0].name, {"app": "svc-backend"})
    client = pod(lab, "svc-client", lab.nodes[1].name)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "default"},
           "spec": {"selector": {"app": "svc-backend"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    lab.kubectl("apply", "-f", "-", input=json.dumps(svc))
    ip = lab.kjson("get", "service", "backend")["spec"]["clusterIP"]
    rules = lambda: run(["iptables-save", "-t", "nat"], ns=lab.nodes[1].ns).stdout
    assert wait_for(lambda: f"-d {ip}/32" in rules() and server["status"]["podIP"] in rules(), 30,
                    "kube-proxy's rules for the Service on the client's node")
    assert wait_for(lambda: connects(lab, "svc-client", ip, 80), 20, "client -> ClusterIP across nodes")
    assert connects(lab, "svc-client", "backend.default.svc.cluster.local", 80), "by name (cluster DNS)"
    lab.kubectl("delete", "service", "backend")
    for p in (server, client):
        lab.kubectl("delete", "pod", p["metadata"]["name"], "--wait=true", "--timeout=60s")


def test_kubectl_delete_pod_leaves_nothing(lab):
    p = pod(lab, "gone", lab.nodes[1].name)
    ip, n, routes = _wired(lab, p)
    veth = re.search(r"dev (cali\w+)", routes).group(1)
    assert veth in run(["ip", "-o", "link"], ns=n.ns).stdout
    lab.kubectl("delete", "pod", "gone", "--wait=true", "--timeout=60s")

    def clean():
        links = run(["ip", "-o", "link"], ns=n.ns).stdout
        rts = run(["ip", "-o", "route", "show", "table", "all"], ns=n.ns).stdout
        addrs = run(["ip", "-o", "addr"], ns=n.ns).stdout
        return veth not in links and f"{ip} " not in rts and f"{ip}/" not in addrs
    assert wait_for(clean, 20, f"no veth, route or address of the deleted pod {ip} on {n.name}")
    # and the address is free in the agent's IPAM
    st = lab.agent_status(n)
    assert ip not in json.dumps(st.get("ipam", {})), st.get("ipam")


def test_manifests_pass_server_side_dry_run(lab):
    for m in ("manifests/tortie.yaml", "manifests/uninstall.yaml"):
        path = os.path.join(os.path.dirname(__file__), "../..", m)
        if not os.path.exists(path):
            continue
        p = lab.kubectl("apply", "--dry-run=server", "-f", "-", input=open(path).read(), check=False)
        assert p.returncode == 0, f"{m}: {p.stderr}"
        assert "(server dry run)" in p.stdout, p.stdout


def test_agent_rights_are_exactly_read_only(lab):
    sa = "system:serviceaccount:tortie-system:tortie-agent"
    out = lab.kubectl("auth", "can-i", "--list", f"--as={sa}").stdout
    rows = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if cols and not cols[0].startswith("["):  # resources (not non-resource URLs)
            rows[cols[0]] = line[line.rindex("[", 0, line.rindex("]")):].strip()
    want = {"pods": "[get list watch]", "namespaces": "[get list watch]", "nodes": "[get list watch]",
            "networkpolicies.networking.k8s.io": "[get list watch]",
            **{f"{plural}.policy.networking.k8s.io": "[get list watch]"
               for plural in ("clusternetworkpolicies", "adminnetworkpolicies", "baselineadminnetworkpolicies")}}
    for r, verbs in want.items():
        assert rows.get(r) == verbs, out
    # beyond them only what every authenticated user gets (self reviews)
    extra = set(rows) - set(want) - {"selfsubjectaccessreviews.authorization.k8s.io",
                                     "selfsubjectrulesreviews.authorization.k8s.io"}
    assert not extra, out
    for verb, res in (("create", "pods"), ("patch", "nodes"), ("delete", "networkpolicies"), ("get", "secrets")):
        assert lab.kubectl("auth", "can-i", verb, res, f"--as={sa}", check=False).stdout.strip() == "no"


@pytest.mark.timeout(4 * 3600)  # the full NetworkPolicy suite takes ~45 min on 2 shared cores
def test_upstream_e2e_specs(lab):
    """The release's own e2e specs (tests/kube/upstream.py): E2E_UPSTREAM=smoke|netpol|pods|services|hostport|network|none
    or a comma list of them."""
    upstream.check_suite_from_env(lab)
