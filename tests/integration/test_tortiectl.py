"""tortiectl as a real process (the installed console script) against a real etcd on
loopback: apply/get/delete, all-or-nothing validation, and its error messages."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from felix_agent import model
from felix_agent.datastore.etcd import EtcdStore

TORTIECTL = shutil.which("tortiectl", path=os.path.dirname(sys.executable)) or shutil.which("tortiectl")

MANIFEST = textwrap.dedent("""\
    apiVersion: v1
    kind: Namespace
    metadata:
      name: shop
      labels: {team: web}
    ---
    apiVersion: v1
    kind: Pod
    metadata:
      name: frontend
      namespace: shop
      labels: {app: frontend}
    spec:
      nodeName: node-1
      containers:
      - name: web
        ports:
        - {name: http, containerPort: 8080}
    status:
      podIP: 10.65.0.10
    ---
    apiVersion: v1
    kind: Node
    metadata:
      name: node-1
      annotations:
        tortie.io/ipv4-address: 192.168.100.11/24
        tortie.io/as-number: "64512"
    ---
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata:
      name: allow-web
      namespace: shop
    spec:
      podSelector: {matchLabels: {app: frontend}}
      ingress:
      - ports: [{port: http}]
    ---
    apiVersion: tortie.io/v1
    kind: IPPool
    metadata:
      name: default
    spec:
      cidr: 10.65.0.0/16
      mode: vxlan
      natOutgoing: true
    ---
    apiVersion: tortie.io/v1
    kind: BGPPeer
    metadata:
      name: tor
    spec: {peerIP: 192.168.100.1, asNumber: 65000}
    """)


def ctl(etcd, *args, stdin=None, env_endpoint=False):
    assert TORTIECTL, "tortiectl console script is not installed (make deps)"
    env = dict(os.environ)
    argv = [TORTIECTL]
    if env_endpoint:
        env["TORTIE_ETCD_ENDPOINTS"] = etcd.endpoint
    else:
        argv += ["--etcd-endpoints", etcd.endpoint]
    return subprocess.run(argv + list(args), input=stdin, capture_output=True, text=True,
                          timeout=60, env=env)


def all_keys(etcd):
    async def go():
        async with EtcdStore("127.0.0.1", etcd.port) as s:
            return [k for k, _ in (await s.list_prefix("/"))[1]]
    return asyncio.run(go())


def test_apply_get_delete_round_trip(etcd, tmp_path):
    f = tmp_path / "cluster.yaml"
    f.write_text(MANIFEST)
    r = ctl(etcd, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "namespace/shop created", "pod/shop/frontend created", "node/node-1 created",
        "networkpolicy/shop/allow-web created", "ippool/default created", "bgppeer/tor created"]
    assert sorted(all_keys(etcd)) == sorted([
        "/tortie/namespaces/shop", "/tortie/pods/shop/frontend", "/tortie/nodes/node-1",
        "/tortie/networkpolicies/shop/allow-web", "/tortie/ippools/default", "/tortie/bgppeers/tor"])
    # Re-applying the same file changes nothing; a changed doc is "configured".
    r = ctl(etcd, "apply", "-f", "-", stdin=MANIFEST.replace("natOutgoing: true", "natOutgoing: false"))
    assert r.returncode == 0, r.stderr
    assert "ippool/default configured" in r.stdout and "pod/shop/frontend unchanged" in r.stdout

    r = ctl(etcd, "get", "pods", env_endpoint=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "NODE", "IPS"]
    assert lines[1].split() == ["shop", "frontend", "node-1", "10.65.0.10"]
    r = ctl(etcd, "get", "po", "-o", "wide")
    assert "http:8080/TCP" in r.stdout and "app=frontend" in r.stdout
    r = ctl(etcd, "get", "ippools")
    assert r.stdout.splitlines()[1].split() == ["default", "10.65.0.0/16", "/26", "vxlan", "false", "false"]
    r = ctl(etcd, "get", "netpol", "allow-web", "-n", "shop", "-o", "json")
    obj = json.loads(r.stdout)
    assert obj["kind"] == "NetworkPolicy" and obj["spec"]["policyTypes"] == ["Ingress"]
    assert obj["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]
    r = ctl(etcd, "get", "nodes", "-o", "yaml")
    doc = yaml.safe_load(r.stdout)
    assert doc["kind"] == "List" and doc["items"][0]["metadata"]["annotations"][
        "tortie.io/as-number"] == "64512"
    r = ctl(etcd, "get", "pod", "missing", "-n", "shop")
    assert r.returncode == 1 and "pod shop/missing not found" in r.stderr

    r = ctl(etcd, "delete", "pod", "frontend", "-n", "shop")
    assert r.returncode == 0 and r.stdout.strip() == "pod/shop/frontend deleted"
    r = ctl(etcd, "delete", "pod", "frontend", "-n", "shop")
    assert r.returncode == 1 and "not found" in r.stderr
    r = ctl(etcd, "delete", "-f", str(f))  # the pod is gone already: reported, rest deleted
    assert r.returncode == 1
    assert "ippool/default deleted" in r.stdout and "bgppeer/tor deleted" in r.stdout
    assert all_keys(etcd) == []
    r = ctl(etcd, "get", "pods")
    assert r.returncode == 0 and r.stdout.strip() == "No pods found."


@pytest.mark.parametrize("bad,expect", [
    ("port: 8080}]", "document 4 (NetworkPolicy shop/allow-web): NetworkPolicy shop/allow-web: "
                     "spec.ingress[0].ports[0].port"),
    ("mode: vxlan", "document 5 (IPPool default): IPPool default: spec.mode: 'gre' is not one of"),
    ("asNumber: 65000", "document 6 (BGPPeer tor): BGPPeer tor: spec.asNumber: 70000000000 is out of range"),
])
def test_one_invalid_document_writes_nothing(etcd, tmp_path, bad, expect):
    text = MANIFEST.replace("ports: [{port: http}]", "ports: [{port: 0}]") if "port: 8080" in bad else (
        MANIFEST.replace("mode: vxlan", "mode: gre") if "mode" in bad else
        MANIFEST.replace("asNumber: 65000", "asNumber: 70000000000"))
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = ctl(etcd, "apply", "-f", str(f))
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {f} ") and expect in r.stderr, r.stderr
    assert r.stdout == ""
    assert all_keys(etcd) == []


def test_apply_errors_are_clear(etcd, tmp_path):
    r = ctl(etcd, "apply", "-f", "-", stdin="kind: Service\nmetadata: {name: s}\n")
    assert r.returncode == 1 and "kind 'Service' cannot be applied" in r.stderr
    r = ctl(etcd, "apply", "-f", "-", stdin="a: [1, 2\n")
    assert r.returncode == 1 and "stdin: invalid YAML" in r.stderr
    r = ctl(etcd, "apply", "-f", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1 and "cannot read" in r.stderr
    r = ctl(etcd, "get", "services")
    assert r.returncode == 1 and "unknown resource type 'services'" in r.stderr
    dup = "kind: Namespace\nmetadata: {name: a}\n---\nkind: Namespace\nmetadata: {name: a}\n"
    r = ctl(etcd, "apply", "-f", "-", stdin=dup)
    assert r.returncode == 1 and "the same object as" in r.stderr
    assert all_keys(etcd) == []


def test_unreachable_etcd(tmp_path):
    from tests.lab import free_port
    r = subprocess.run([TORTIECTL, "--etcd-endpoints", f"127.0.0.1:{free_port()}", "get", "pods"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach etcd at 127.0.0.1:" in r.stderr
    assert "TORTIE_ETCD_ENDPOINTS" in r.stderr


def test_applied_objects_reach_a_syncer(etcd, tmp_path):
    """What tortiectl writes is what the agents' syncer reads."""
    from felix_agent.datastore.etcd import EtcdSyncer
    from tests.fakes.recorder import running
    assert ctl(etcd, "apply", "-f", "-", stdin=MANIFEST).returncode == 0

    async def go():
        async with running(EtcdSyncer(EtcdStore("127.0.0.1", etcd.port))) as rec:
            await rec.wait_in_sync()
            return dict(rec.state)
    state = asyncio.run(go())
    assert state[("IPPool", "default")] == model.IPPool("default", "10.65.0.0/16", mode="vxlan",
                                                         nat_outgoing=True)
    assert state[("Node", "node-1")].ip == "192.168.100.11/24"
    assert state[("Pod", "shop/frontend")].ports == (model.NamedPort("http", 8080),)
    assert len(state) == 6


def test_apply_more_objects_than_one_etcd_transaction_holds(etcd):
    """etcd refuses transactions over 128 operations (--max-txn-ops); a 300-document file
    must still land whole."""
    docs = "\n---\n".join(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: bulk-{i}}}" for i in range(300))
    p = subprocess.run([TORTIECTL, "--etcd-endpoints", etcd.endpoint, "apply", "-f", "-"], input=docs,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = subprocess.run([TORTIECTL, "--etcd-endpoints", etcd.endpoint, "get", "namespaces", "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    names = {o["metadata"]["name"] for o in json.loads(got.stdout)["items"]}
    assert {f"bulk-{i}" for i in range(300)} <= names


def test_get_pods_all_namespaces_and_wired_addresses(etcd):
    """-A / --all-namespaces as kubectl has them; a Pod applied without status (nobody plays
    kubelet in etcd mode) shows the addresses its CNI ADD wired, from its WorkloadEndpoint."""
    docs = MANIFEST.replace("status:\n  podIP: 10.65.0.10\n", "") + textwrap.dedent("""\
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: db, namespace: store}
        spec: {nodeName: node-1, containers: [{name: c}]}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: unwired, namespace: store}
        spec: {nodeName: node-1, containers: [{name: c}]}
        """)
    assert "status" not in docs
    assert ctl(etcd, "apply", "-f", "-", stdin=docs).returncode == 0

    async def wire():
        async with EtcdStore("127.0.0.1", etcd.port) as s:
            await s.put_records([
                model.WorkloadEndpoint("shop", "frontend", "node-1", "c1", "cali1", ("10.65.0.7",)),
                model.WorkloadEndpoint("store", "db", "node-1", "c2", "cali2", ("10.65.0.8", "fd00::8"))])
    asyncio.run(wire())
    want = {("shop", "frontend"): "10.65.0.7", ("store", "db"): "10.65.0.8,fd00::8",
            ("store", "unwired"): "<none>"}
    for flags in (["-A", "-o", "wide"], ["--all-namespaces"], ["-A", "-n", "shop"], []):
        r = ctl(etcd, "get", "pods", *flags)
        assert r.returncode == 0, r.stderr
        rows = [ln.split() for ln in r.stdout.splitlines()]
        assert rows[0][:4] == ["NAMESPACE", "NAME", "NODE", "IPS"]
        assert {(x[0], x[1]): x[3] for x in rows[1:]} == want, (flags, r.stdout)
    r = ctl(etcd, "get", "pods", "-n", "store")
    assert [ln.split()[1] for ln in r.stdout.splitlines()[1:]] == ["db", "unwired"]
    r = ctl(etcd, "get", "pod", "db", "-n", "store")
    assert r.stdout.splitlines()[1].split() == ["store", "db", "node-1", "10.65.0.8,fd00::8"]
    # the stored Pod stays as applied: no status invented in json/yaml
    assert "podIP" not in ctl(etcd, "get", "pod", "db", "-n", "store", "-o", "json").stdout
    r = ctl(etcd, "get", "pod", "db", "-A")
    assert r.returncode == 1 and "cannot be retrieved by name across all namespaces" in r.stderr
