"""Every `tortiectl` command that README.md shows in a code block, run as written against a
real lab cluster (etcd, two nodes with tortie-agent and BIRD, a pod wired by the built CNI
binary), each checked for what the README says it shows.

As a reader would run them: through bash, with `.venv/bin` on PATH (the README's `source
.venv/bin/activate`). Two substitutions, because the lab must not use the root namespace's
port 2379 (another etcd may own it): `--etcd-endpoints 127.0.0.1:2379` becomes the lab etcd's
endpoint, and commands without it get TORTIE_ETCD_ENDPOINTS. Commands about a node's agent
(status, node status, ipam show) run inside node1, as the README says to."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
import yaml

from tests.lab.cluster import VENV_BIN, wait_for
from tests.lab.cnibin import ROOT

pytestmark = pytest.mark.root

README = os.path.join(ROOT, "README.md")

# The cluster.yaml the README's examples apply (its examples name shop, frontend, allow-web).
CLUSTER_YAML = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: web}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec:
  nodeName: node1
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: frontend}}
  ingress: [{ports: [{port: http}]}]
"""


def readme_yaml(filename: str) -> str:
    """The ```yaml block that follows the first mention of `filename` in README.md."""
    text = open(README).read()
    rest = text[text.index(f"`{filename}`"):]
    block = rest[rest.index("```yaml\n") + len("```yaml\n"):]
    return block[:block.index("```")]


def readme_commands() -> list[str]:
    """The tortiectl command lines of README.md's code blocks (``` fenced or indented by four),
    without a `$ ` prompt and trailing comment; a comment `# or: X` is the command `tortiectl X`."""
    out, fenced = [], False
    # a command continued with a trailing backslash is one command
    for line in open(README).read().replace("\\\n", " ").splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        text = line.strip().removeprefix("$ ")
        if not text.startswith("tortiectl "):
            continue
        cmd, _, comment = text.partition("#")
        out.append(cmd.strip())
        if comment.strip().startswith("or: "):
            out.append("tortiectl " + comment.strip()[4:].strip())
    return out


def status_labels() -> list[str]:
    """The field names of the README's sample `tortiectl status` output."""
    text = open(README).read()
    sample = text[text.index("$ tortiectl status\n"):].split("$ tortiectl node status")[0]
    return [ln.split(":")[0] + ":" for ln in sample.splitlines()[1:] if re.match(r"^[A-Za-z][A-Za-z ]+:\s", ln)]


def test_every_readme_tortiectl_example_works(make_cluster, tmp_path):
    c = make_cluster(2)
    (tmp_path / "cluster.yaml").write_text(CLUSTER_YAML)
    (tmp_path / "admin-policy.yaml").write_text(readme_yaml("admin-policy.yaml"))
    (tmp_path / "pool-v6.yaml").write_text(readme_yaml("pool-v6.yaml"))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", TORTIE_ETCD_ENDPOINTS=c.etcd.endpoint)
    node1 = c.lab.node("node1")
    state: dict = {}

    def run(cmd: str, in_node: bool = False) -> str:
        line = cmd.replace("--etcd-endpoints 127.0.0.1:2379", f"--etcd-endpoints {c.etcd.endpoint}")
        argv = ["bash", "-c", line]
        if in_node:
            argv = ["ip", "netns", "exec", node1.ns, *argv]
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
        return p.stdout

    def apply(out: str) -> None:
        assert out.splitlines() == ["namespace/shop created", "pod/shop/frontend created",
                                    "networkpolicy/shop/allow-web created"], out
        # the runtime wires the pod on node1 (the Pod above is its Kubernetes object)
        state["ip"] = c.add_pod("shop", "frontend", node1, register=False).ip
        wait_for(lambda: "<none>" not in run("tortiectl get pods -n shop"), timeout=20,
                 what="the pod's endpoint to be published")

    def get_pods(out: str) -> None:
        rows = [ln.split() for ln in out.splitlines()]
        assert rows[0][:4] == ["NAMESPACE", "NAME", "NODE", "IPS"] and "LABELS" in rows[0], out
        assert [r[:4] for r in rows[1:]] == [["shop", "frontend", "node1", state["ip"]]], out

    def get_netpol(out: str) -> None:
        doc = yaml.safe_load(out)
        assert doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "allow-web", out
        assert doc["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}], out

    def apply_cnp(out: str) -> None:
        assert out.splitlines() == ["clusternetworkpolicy/shop-guard created"], out

    def get_cnp(out: str) -> None:
        rows = [ln.split() for ln in out.splitlines()]
        assert rows[0][:4] == ["NAME", "TIER", "PRIORITY", "SUBJECT"] and "INGRESS-RULES" in rows[0], out
        assert rows[1][:3] == ["shop-guard", "Admin", "10"] and rows[1][-2:] == ["2", "0"], out

    def trace(out: str) -> None:
        text = open(README).read()
        sample = text[text.index("    192.0.2.10 -> shop/frontend"):].split("\n\n")[0]
        assert out.splitlines() == [ln[4:] for ln in sample.splitlines()], out

    def status(out: str) -> None:
        for label in status_labels():  # the README's sample shows the real fields
            assert label in out, (label, out)
        assert "in sync" in out and "shop/frontend" in out and state["ip"] in out, out
        assert re.search(r"Mesh_192_168_100_12\s+up", out), out

    def node_status(out: str) -> None:
        assert "Mesh_192_168_100_12" in out and "Established" in out, out

    def ipam_show(out: str) -> None:
        assert state["ip"] in out, out

    def delete_pod(out: str) -> None:
        assert out.strip() == "pod/shop/frontend deleted", out

    def apply_pool6(out: str) -> None:
        assert out.splitlines() == ["ippool/pool-v6 created"], out
        pool = yaml.safe_load(run("tortiectl get ippool pool-v6 -o yaml"))
        assert pool["spec"]["blockSize"] == 122 and pool["spec"]["cidr"] == "fd00:10:65::/112", pool

    def delete_file(out: str) -> None:
        assert "networkpolicy/shop/allow-web deleted" in out and "namespace/shop deleted" in out, out
        assert "No networkpolicies found." in run("tortiectl get netpol -A")

    # In this order (the node views while the pod exists, deletions last); `before` runs first.
    checks = [
        ("tortiectl --etcd-endpoints 127.0.0.1:2379 apply -f cluster.yaml", False, apply, None),
        ("tortiectl get pods -A -o wide", False, get_pods, None),
        ("tortiectl get netpol allow-web -n shop -o yaml", False, get_netpol, None),
        ("tortiectl apply -f admin-policy.yaml", False, apply_cnp, None),
        ("tortiectl get cnp -o wide", False, get_cnp, None),
        ("tortiectl trace 192.0.2.10 shop/frontend 9090/tcp", False, trace, None),
        ("tortiectl status", True, status, None),
        ("tortiectl node status", True, node_status, None),
        ("tortiectl ipam show", True, ipam_show, None),
        ("tortiectl delete pod frontend -n shop", False, delete_pod, None),
        ("tortiectl delete -f cluster.yaml", False, delete_file, "tortiectl apply -f cluster.yaml"),
        ("tortiectl apply -f pool-v6.yaml", False, apply_pool6, None),
    ]
    # the TLS example needs an etcd with client-cert auth: test_etcd_tls.py runs it
    plain = [cmd for cmd in readme_commands() if "--etcd-ca-file" not in cmd]
    assert sorted(plain) == sorted(cmd for cmd, *_ in checks), \
        "README.md's tortiectl examples changed: give each new one a check here"
    for cmd, in_node, check, before in checks:
        if before:
            run(before)
        if in_node:  # a node's view catches up within a pass or two (BGP sessions): retry a while
            deadline = time.monotonic() + 30
            while not _passes(check, run(cmd, True)) and time.monotonic() < deadline:
                time.sleep(0.5)
        check(run(cmd, in_node))


def _passes(check, out: str) -> bool:
    try:
        check(out)
        return True
    except AssertionError:
        return False
