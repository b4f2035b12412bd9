"""Re-record the stand-in API server's replay data (tests/fakes/apiserver.py) from a REAL
kube-apiserver: the lab's (tests/kube/cluster.py), or a running `make kube-up` cluster.

    python -m tests.kube.record_fixtures [--prefix tkXXXXXX] [--out tests/fixtures/k8s-api]

It sets up the cluster state the recordings describe (namespaces x, y, z labelled ns=<name>
and team=a|b|c; pods a, b, c in each, labelled pod=<name>, with ports 80/81 TCP, 80 UDP (and
80 SCTP where the server accepts it); the NetworkPolicies of the README table in x), then
GETs each list (also paged with limit=4), runs the four watches for WATCH_SECONDS while the
scripted changes happen (pod x/d created, relabelled, deleted; namespace y relabelled, w
created and deleted; policy x/watch-demo created, patched, deleted; node node-b created,
annotated, deleted), and provokes the error answers (410 list/continue/watch, 401, 403, 404).
Bodies are stored byte for byte as received, requested with a curl User-Agent (so lists and
errors come pretty-printed, as in the recordings), plus headers.txt and a README.md header
naming the server version.  The data differ from the v1.28 originals in what the server
version and the lab decide (node names, addresses, resourceVersions, v1.20's fields; v1.20
drops endPort, and its watch cache answers a watch from resourceVersion 1 with the cached
events instead of a 410 ERROR event): tests that pin such values must be updated with the data.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request

from tests.kube.cluster import BASE, CP_IP, KubeLab, run, wait_for
from tests.kube import images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WATCH_SECONDS = 80
UA = "curl/7.88.1"


class Client:
    """Plain HTTPS to the API server from the control-plane namespace (a thread in this
    process cannot enter it, so requests go through a tiny relay: python in the cp netns)."""

    def __init__(self, lab: KubeLab, token: str):
        self.lab, self.token = lab, token
        self.headers: list[str] = []

    def get(self, path: str, token: str | None = None, timeout: float = 30) -> tuple[int, bytes, str]:
        code = r"""
import ssl, sys, urllib.request, urllib.error, json
ctx = ssl.create_default_context(cafile=sys.argv[3])
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2],
                             "Accept": "application/json", "User-Agent": "%s"})
try:
    r = urllib.request.urlopen(req, context=ctx, timeout=float(sys.argv[4]))
    status, hdrs, body = r.status, str(r.headers), r.read()
except urllib.error.HTTPError as e:
    status, hdrs, body = e.code, str(e.headers), e.read()
sys.stdout.buffer.write(json.dumps([status, hdrs]).encode() + b"\n" + body)
""" % UA
        p = run(["python3", "-c", code, f"https://{CP_IP}:6443{path}", token or self.token,
                 os.path.join(self.lab.dir, "pki/ca.crt"), str(timeout)], ns=self.lab.cp, timeout=timeout + 30)
        head, _, body = p.stdout.encode("utf-8", "surrogateescape").partition(b"\n")
        status, hdrs = json.loads(head)
        self.headers.append(f"GET {path}\nHTTP {status}\n{hdrs}")
        return status, body, hdrs


def setup_state(lab: KubeLab) -> None:
    teams = {"x": "a", "y": "b", "z": "c"}
    node = lab.nodes[0].name
    for ns, team in teams.items():
        lab.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"ns": ns, "team": team, "kubernetes.io/metadata.name": ns}}}))
        for name in ("a", "b", "c"):
            lab.kubectl("apply", "-f", "-", input=json.dumps(pod_spec(ns, name, node)))
    for ns in teams:
        lab.kubectl("-n", ns, "wait", "--for=condition=Ready", "pod", "--all", "--timeout=120s", timeout=150)
    with open(os.path.join(os.path.dirname(__file__), "fixture_policies.json")) as f:
        # endPort (1.21+) is unknown to a v1.20 server: it drops the field, the client must not refuse
        lab.kubectl("apply", "--validate=false", "-f", "-", input=f.read())


def pod_spec(ns: str, name: str, node: str) -> dict:
    ports = [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
             {"name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP"},
             {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 2,
                     "containers": [{"name": "cont", "image": images.BUSYBOX, "command": ["sleep", "3600"],
                                     "ports": ports}]}}


def changes(lab: KubeLab) -> None:
    """The scripted changes made while the watches run (see the module doc)."""
    node = lab.nodes[0].name
    lab.kubectl("apply", "-f", "-", input=json.dumps({**pod_spec("x", "d", node),
                                                      "metadata": {"name": "d", "namespace": "x",
                                                                   "labels": {"pod": "d"}}}))
    lab.kubectl("-n", "x", "wait", "--for=condition=Ready", "pod/d", "--timeout=60s", timeout=90)
    lab.kubectl("label", "namespace", "y", "env=test")
    lab.kubectl("create", "namespace", "w")
    lab.kubectl("label", "namespace", "w", "team=d")
    lab.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "watch-demo", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}}))
    lab.kubectl("-n", "x", "label", "pod", "d", "pod=e", "--overwrite")
    lab.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-b"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"},
                                                                 {"type": "Hostname", "address": "node-b"}]}}))
    lab.kubectl("-n", "x", "patch", "networkpolicy", "watch-demo", "--type=json", "-p", json.dumps([
        {"op": "add", "path": "/spec/ingress/0/from/0/podSelector", "value": {"matchLabels": {"pod": "a"}}},
        {"op": "add", "path": "/spec/ingress/0/ports", "value": [{"port": "serve-80-udp", "protocol": "UDP"}]}]))
    lab.kubectl("label", "namespace", "y", "team=bb", "--overwrite")
    lab.kubectl("annotate", "node", "node-b", "example.com/note=recorded")
    lab.kubectl("-n", "x", "delete", "pod", "d", "--grace-period=2", "--wait=false")
    lab.kubectl("delete", "namespace", "w", "--wait=false")
    lab.kubectl("-n", "x", "delete", "networkpolicy", "watch-demo")
    time.sleep(max(0, WATCH_SECONDS - 25))
    lab.kubectl("delete", "node", "node-b", "--wait=false")


def record(lab: KubeLab, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    admin = Client(lab, lab.tokens_admin())
    written = []

    def save(name: str, body: bytes) -> None:
        with open(os.path.join(out, name), "wb") as f:
            f.write(body)
        written.append(name)

    lists = {"namespaces": "/api/v1/namespaces", "nodes": "/api/v1/nodes", "pods": "/api/v1/pods",
             "networkpolicies": "/apis/networking.k8s.io/v1/networkpolicies"}
    rv = {}
    for name, path in lists.items():
        status, body, _ = admin.get(path)
        assert status == 200, (path, status, body[:300])
        save(f"{name}.json", body)
        rv[name] = json.loads(body)["metadata"]["resourceVersion"]
    cont, page = "", 1
    while True:
        path = "/api/v1/pods?limit=4" + (f"&continue={cont}" if cont else "")
        status, body, _ = admin.get(path)
        save(f"pods-page{page}.json", body)
        cont = json.loads(body)["metadata"].get("continue", "")
        if not cont:
            break
        page += 1
    first_continue = json.loads(open(os.path.join(out, "pods-page1.json"), "rb").read())["metadata"]["continue"]

    results: dict[str, bytes] = {}

    def watch(name: str, path: str) -> None:
        q = f"{path}?watch=true&allowWatchBookmarks=true&resourceVersion={rv[name]}&timeoutSeconds={WATCH_SECONDS}"
        results[name] = admin.get(q, timeout=WATCH_SECONDS + 30)[1]

    threads = [threading.Thread(target=watch, args=(n, p)) for n, p in lists.items()]
    for t in threads:
        t.start()
    time.sleep(2)
    changes(lab)
    for t in threads:
        t.join()
    for name, body in results.items():
        save(f"{name}-watch.ndjson", body)

    # errors: compact etcd first, so resourceVersion 1 and the first page's snapshot are gone
    head = json.loads(admin.get("/api/v1/namespaces?limit=1")[1])["metadata"]["resourceVersion"]
    run(["etcdctl", "--endpoints=http://127.0.0.1:2379", "compact", head], ns=lab.cp,
        env={"ETCDCTL_API": "3"})
    save("gone-410.json", admin.get("/api/v1/pods?resourceVersion=1&resourceVersionMatch=Exact")[1])
    save("gone-410-watch.ndjson", admin.get(
        "/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion=1&timeoutSeconds=5", timeout=20)[1])
    save("gone-410-continue.json", admin.get(f"/api/v1/pods?limit=4&continue={first_continue}")[1])
    save("unauthorized-401.json", admin.get("/api/v1/pods", token="not-a-valid-token")[1])
    lab.kubectl("-n", "x", "create", "serviceaccount", "no-rights")
    save("forbidden-403.json", admin.get("/api/v1/pods", token=lab.service_account_token("x", "no-rights"))[1])
    save("notfound-404.json", admin.get("/api/v1/namespaces/x/pods/missing")[1])
    with open(os.path.join(out, "headers.txt"), "w") as f:
        f.write("\n".join(h for h in admin.headers if "watch=true" not in h or "resourceVersion=1" in h) + "\n")
    written.append("headers.txt")
    version = json.loads(lab.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    with open(os.path.join(out, "RECORDED.md"), "w") as f:
        f.write(f"Recorded by tests/kube/record_fixtures.py from kube-apiserver {version} "
                f"(lab {lab.prefix}) on {time.strftime('%Y-%m-%d', time.gmtime())}; see its docstring.\n")
    return written


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/k8s-api"))
    ap.add_argument("--prefix", help="a running `make kube-up` cluster to record from (default: start one)")
    a = ap.parse_args(argv)
    own = a.prefix is None
    lab = KubeLab.attach(a.prefix) if a.prefix else KubeLab()
    try:
        if own:
            lab.up()
        setup_state(lab)
        names = record(lab, a.out)
        print(f"recorded {len(names)} files into {a.out}")
    finally:
        if own:
            lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
