"""Cluster policy truth tables on the real data path: ClusterNetworkPolicy (v1alpha2), and
the same cases written as AdminNetworkPolicy/BaselineAdminNetworkPolicy (v1alpha1),
together with NetworkPolicies, on the x/y/z x a/b/c world of test_netpol_truth_table
(same cluster shape, helpers and probers; see its docstring).

Each case applies its policies with tortiectl, waits for the tier chains on the nodes
whose pods they select, probes the whole 9x9 matrix per port with real connections and
compares it exactly with the reference evaluator (test_netpol_reference: the tiers written
from the network-policy-api docs, no tortie code).  Then it deletes them and waits for full
reachability again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections import defaultdict

import pytest

from felix_agent.calc.trace import Tracer
from felix_agent.datastore.etcd import EtcdStore
from tests.lab.cluster import SERVER, wait_for
from tests.lab.prober import flush_conntrack
from tortiectl.trace import load_cluster

from tests.integration.test_netpol_truth_table import (  # noqa: F401  (world: the module's fixture)
    Case,
    Step,
    World,
    check_late_pod,
    host,
    ml,
    pol,
    world,
)

pytestmark = pytest.mark.root

CNP_API = "policy.networking.k8s.io/v1alpha2"
ANP_API = "policy.networking.k8s.io/v1alpha1"
EVERY_NS = {"namespaces": {}}


def cnp(name: str, tier: str, priority: int, subject: dict, *, ingress: list | None = None,
        egress: list | None = None) -> dict:
    spec: dict = {"tier": tier, "priority": priority, "subject": subject}
    if ingress:
        spec["ingress"] = ingress
    if egress:
        spec["egress"] = egress
    return {"apiVersion": CNP_API, "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec}


def in_ns(ns: str) -> dict:
    return {"namespaces": ml(ns=ns)}


def pods(pod: dict, ns: dict | None = None) -> dict:
    return {"pods": {"namespaceSelector": ns or {}, "podSelector": pod}}


def ing(action: str, *peers: dict, protocols: list | None = None) -> dict:
    return {"action": action, "from": list(peers), **({"protocols": protocols} if protocols else {})}


def eg(action: str, *peers: dict, protocols: list | None = None) -> dict:
    return {"action": action, "to": list(peers), **({"protocols": protocols} if protocols else {})}


def tcp(start: int, end: int | None = None) -> dict:
    port = {"number": start} if end is None else {"range": {"start": start, "end": end}}
    return {"tcp": {"destinationPort": port}}


def named(name: str) -> dict:
    return {"destinationNamedPort": name}


# --- the same policy in the v1alpha1 spelling --------------------------------------------

def _anp_port(p: dict) -> dict:
    if "destinationNamedPort" in p:
        return {"namedPort": p["destinationNamedPort"]}
    (proto, body), = p.items()
    d = body["destinationPort"]
    if "number" in d:
        return {"portNumber": {"protocol": proto.upper(), "port": d["number"]}}
    return {"portRange": {"protocol": proto.upper(), **d["range"]}}


def as_v1alpha1(policy: dict) -> dict:
    """A CNP as an ANP (tier Admin) or the BANP (tier Baseline); a NetworkPolicy as it is.
    Raises ValueError for what v1alpha1 cannot say (a Baseline Pass)."""
    if policy["kind"] != "ClusterNetworkPolicy":
        return policy
    spec = policy["spec"]
    baseline = spec["tier"] == "Baseline"
    out: dict = {"subject": spec["subject"]}
    if not baseline:
        out["priority"] = spec["priority"]
    for direction in ("ingress", "egress"):
        rules = []
        for r in spec.get(direction) or []:
            if baseline and r["action"] == "Pass":
                raise ValueError("a BaselineAdminNetworkPolicy has no Pass")
            rule = {k: v for k, v in r.items() if k != "protocols"}
            rule["action"] = "Allow" if r["action"] == "Accept" else r["action"]
            if r.get("protocols"):
                rule["ports"] = [_anp_port(p) for p in r["protocols"]]
            rules.append(rule)
        if rules:
            out[direction] = rules
    kind = "BaselineAdminNetworkPolicy" if baseline else "AdminNetworkPolicy"
    return {"apiVersion": ANP_API, "kind": kind, "metadata": {"name": "default" if baseline else
                                                              policy["metadata"]["name"]}, "spec": out}


def v1alpha1_case(case: Case) -> Case | None:
    """The case with its CNPs written as ANP/BANP, or None when v1alpha1 cannot say it (a
    Baseline Pass, or more than one Baseline policy: there is one BANP)."""
    try:
        converted = [as_v1alpha1(p) for p in case.policies(defaultdict(lambda: "10.65.0.1"))]
    except ValueError:
        return None
    if sum(p["kind"] == "BaselineAdminNetworkPolicy" for p in converted) > 1:
        return None
    return dataclasses.replace(case, name=case.name + "-v1alpha1",
                               policies=lambda ip, f=case.policies: [as_v1alpha1(p) for p in f(ip)])


# --- the cases -------------------------------------------------------------------------------

X = in_ns("x")
ALLOW_ALL_X = pol("allow-all", "x", ingress=[{}])
DENY_ALL_X = pol("deny-all", "x", types=["Ingress"])

CASES = [
    Case("admin-deny-overrides-networkpolicy-allow", lambda ip: [
        ALLOW_ALL_X, cnp("deny-y", "Admin", 10, X, ingress=[ing("Deny", in_ns("y"))])]),
    Case("admin-accept-overrides-networkpolicy-deny", lambda ip: [
        DENY_ALL_X, cnp("accept-y", "Admin", 10, X, ingress=[ing("Accept", in_ns("y"))])]),
    Case("admin-pass-hands-over-to-networkpolicy", lambda ip: [
        pol("allow-y", "x", ingress=[{"from": [{"namespaceSelector": ml(ns="y")}]}]),
        cnp("pass-y-deny-rest", "Admin", 10, X, ingress=[ing("Pass", in_ns("y")), ing("Deny", EVERY_NS)])]),
    Case("priority-between-two-policies", lambda ip: [
        cnp("low-deny-all", "Admin", 20, pods(ml(pod="a")), ingress=[ing("Deny", EVERY_NS)]),
        cnp("high-accept-y", "Admin", 10, pods(ml(pod="a")), ingress=[ing("Accept", in_ns("y"))])]),
    Case("rule-order-inside-one-policy", lambda ip: [
        cnp("ordered", "Admin", 10, X, ingress=[ing("Accept", pods(ml(pod="a"), ml(ns="y"))),
                                               ing("Deny", in_ns("y"))])]),
    Case("baseline-only-where-no-networkpolicy-selects", lambda ip: [
        pol("allow-all-y", "y", ingress=[{}]),
        cnp("baseline-deny-z", "Baseline", 10, EVERY_NS, ingress=[ing("Deny", in_ns("z"))])]),
    Case("baseline-after-an-admin-pass", lambda ip: [
        cnp("pass-z", "Admin", 10, X, ingress=[ing("Pass", in_ns("z"))]),
        cnp("baseline-deny", "Baseline", 10, X, ingress=[ing("Deny", EVERY_NS)])]),
    Case("named-port-resolves-per-destination", lambda ip: [
        cnp("deny-web", "Admin", 10, X, ingress=[ing("Deny", EVERY_NS, protocols=[named("web")])])]),
    Case("port-range", lambda ip: [
        cnp("deny-80-81", "Admin", 10, in_ns("y"), ingress=[ing("Deny", EVERY_NS, protocols=[tcp(80, 81)])])]),
    Case("port-number-and-udp-untouched", lambda ip: [
        cnp("deny-81", "Admin", 10, in_ns("z"), ingress=[ing("Deny", in_ns("x"), protocols=[tcp(81)])])]),
    Case("egress-to-a-cidr", lambda ip: [
        cnp("deny-to-hosts", "Admin", 10, pods(ml(pod="a")),
            egress=[eg("Deny", {"networks": [host(ip["y/c"]), host(ip["z/b"])]})])]),
    Case("egress-accept-cidr-over-networkpolicy-egress-deny", lambda ip: [
        pol("deny-egress", "x", types=["Egress"]),
        cnp("accept-to-z", "Admin", 10, X, egress=[eg("Accept", {"networks": [ip["z/a"] + "/32"]})])]),
    Case("subject-by-pods-in-a-namespace", lambda ip: [
        cnp("lock-x-b", "Admin", 10, pods(ml(pod="b"), ml(ns="x")), ingress=[ing("Deny", EVERY_NS)],
            egress=[eg("Deny", EVERY_NS)])]),
    Case("label-changes-after-the-policy", lambda ip: [
        cnp("lock", "Admin", 10, pods(ml(role="locked")), ingress=[ing("Deny", in_ns("y"))]),
        cnp("blue", "Admin", 11, {"namespaces": ml(team="blue")}, ingress=[ing("Deny", pods(ml(pod="a")))])],
        steps=(Step("x/b gets locked, z joins team blue", pod_labels={"x/b": {"role": "locked"}},
                    ns_labels={"z": {"team": "blue"}}),
               Step("the lock moves to z/c, z leaves blue", pod_labels={"x/b": {}, "z/c": {"role": "locked"}},
                    ns_labels={"z": {}}))),
]
V1ALPHA1_CASES = [c for c in (v1alpha1_case(c) for c in CASES) if c is not None]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cluster_network_policy_truth_table(world: World, case: Case):
    world.run_case(case)


@pytest.mark.parametrize("case", V1ALPHA1_CASES, ids=[c.name for c in V1ALPHA1_CASES])
def test_admin_network_policy_truth_table(world: World, case: Case):
    world.run_case(case)


def test_pod_created_after_the_cluster_policy_is_protected_from_its_first_packet(world: World):
    check_late_pod(world, [
        cnp("late", "Admin", 10, pods(ml(pod="late"), ml(ns="x")),
            ingress=[ing("Accept", pods(ml(pod="a"), ml(ns="x"))), ing("Deny", EVERY_NS)],
            egress=[eg("Accept", pods(ml(pod="a"), ml(ns="x"))), eg("Deny", EVERY_NS)]),
        # an Accept of everything for x/c (no effect): its chain on node2 says node2 has the batch
        cnp("sentinel", "Admin", 11, pods(ml(pod="c"), ml(ns="x")), ingress=[ing("Accept", EVERY_NS)])])


def test_every_case_also_runs_in_the_v1alpha1_spelling():
    assert [c.name for c in CASES if c.name + "-v1alpha1" not in {v.name for v in V1ALPHA1_CASES}] == []


# --- egress to nodes ---------------------------------------------------------------------------

NODE_PORT = 18080


def _label_node(world: World, name: str, labels: dict) -> None:
    """Set a Node record's labels (the agent keeps them when it republishes its address)."""
    doc = json.loads(world.cluster.tortiectl("get", "node", name, "-o", "json").stdout)
    doc["metadata"]["labels"] = labels
    world.cluster.apply(doc)


def test_egress_to_nodes_by_label(world: World):
    """A `nodes` peer (a node label selector; the agent matches it with a cali40h set of the
    picked nodes' addresses): x may reach zone-a nodes although a NetworkPolicy denies x all
    egress, y may not reach zone-b nodes on NODE_PORT; probed from every pod to each node's
    own address (a server in the node namespace), and `tortiectl trace` agrees on every cell."""
    c = world.cluster
    nodes = {n.name: n for n in c.lab.nodes}
    zone = {"node1": "a", "node2": "b"}
    servers = [c.lab.popen(n.ns, [sys.executable, "-c", SERVER, f"tcp:{NODE_PORT}"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True) for n in nodes.values()]
    policies = [
        pol("deny-egress", "x", types=["Egress"]),
        cnp("accept-x-to-zone-a", "Admin", 10, X, egress=[eg("Accept", {"nodes": ml(zone="a")})]),
        cnp("deny-y-to-zone-b", "Admin", 11, in_ns("y"),
            egress=[eg("Deny", {"nodes": ml(zone="b")}, protocols=[tcp(NODE_PORT)])]),
    ]
    try:
        assert all(s.stdout.readline().strip() == "ready" for s in servers)
        for name, z in zone.items():
            _label_node(world, name, {"zone": z})
        c.apply(policies)
        world.wait_programmed(policies)

        def expect(key: str, node: str) -> bool:
            ns = key.split("/")[0]
            return not ((ns == "x" and zone[node] != "a") or (ns == "y" and zone[node] == "b"))
        want = {(k, n): expect(k, n) for k in world.pods for n in nodes}

        def observe():
            flush_conntrack(world.node_namespaces)
            return {(k, n): c.probe(pod, nodes[n].ip, NODE_PORT, timeout=0.5)
                    for k, pod in world.pods.items() for n in nodes}
        got = wait_for(lambda: (lambda o: o if o == want else None)(observe()), timeout=30,
                       what="pod -> node probes as the policies say")
        assert got == want and not all(want.values()) and any(want.values())

        async def load():
            async with EtcdStore.from_endpoint(c.etcd.endpoint) as store:
                return await load_cluster(store)
        tracer = Tracer(asyncio.run(load()))
        eps = tracer.cluster.endpoint_map()
        for (key, node), ok in want.items():
            t = tracer.trace(eps[tuple(key.split("/"))], nodes[node].ip, NODE_PORT, "tcp")
            assert t.allowed == ok, (key, node, t.reason)
        t = tracer.trace(eps[("y", "a")], nodes["node2"].ip, NODE_PORT, "tcp")
        assert any(s.policy == "ClusterNetworkPolicy/deny-y-to-zone-b" and s.action == "Deny"
                   for d in t.directions for s in d.steps), t
    finally:
        for s in servers:
            s.kill()
            s.wait()
        for name in zone:
            _label_node(world, name, {})
        world.reset(policies)
