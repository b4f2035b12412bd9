"""NetworkPolicy truth tables on the real data path, modelled on upstream's netpol e2e.

One cluster per module (building it is the slow part): real etcd, two nodes each running
tortie-agent with BIRD, namespaces x, y, z (labels ns=<name>) with pods a, b, c each
(labels pod=<name>): a and b on node1, c on node2, so every matrix has same-node and
cross-node pairs.  Every pod serves TCP 80 and 81 and UDP 80 (and SCTP 80 when the kernel
has SCTP) with containerPorts named serve-80-tcp, serve-81-tcp, serve-80-udp
(serve-80-sctp), plus "web", which is 80/TCP on a and b but 81/TCP on c, so named ports
are seen to resolve per destination pod.

Each case applies its policies (and label changes) with tortiectl, waits until the
agents have programmed the policy chains, probes the whole 9x9 matrix per port with one
long-lived prober per pod (tests/lab/prober.py), and compares it EXACTLY with the matrix the
reference evaluator (test_netpol_reference.py, no tortie code) computes.  Then it deletes
its policies, restores labels and waits for full reachability again, which also proves that
deleting a policy restores access.

The diagonal: a pod connecting to its own IP never leaves the pod (the kernel loops it back
before any cali interface), so no chain sees it; it is expected allowed, as upstream does,
and probed all the same.  Conntrack is flushed in the node namespaces before every pass so
an old UDP flow cannot carry a new probe past a policy.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import pytest

from felix_agent.calc.trace import Tracer
from felix_agent.datastore.etcd import EtcdStore
from tests.integration.test_netpol_reference import (
    CLUSTER_KINDS,
    NS_NAME_LABEL,
    RefPod,
    tier_peer_matches,
    expected_matrix,
    selector_matches,
)
from tests.lab import Etcd, Lab, sh
from tests.lab.cluster import LabCluster, LabPod, wait_for
from tests.lab.prober import (
    OK,
    TIMEOUT,
    Probe,
    Prober,
    anti_spoof_drops,
    flush_conntrack,
    matrix_diff,
    probe_matrix,
    run_batches,
    sctp_available,
    wait_matrix,
)
from tests.lab.tools import is_root
from tortiectl.trace import load_cluster

pytestmark = pytest.mark.root

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
NODE_OF = {"a": "node1", "b": "node1", "c": "node2"}
POOL = "10.65.0.0/16"
WEB_PORT = {"a": 80, "b": 80, "c": 81}  # the named port "web" differs per pod


def pod_ports(name: str, sctp: bool) -> list[dict]:
    ports = [{"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
             {"name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP"},
             {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
             {"name": "web", "containerPort": WEB_PORT[name], "protocol": "TCP"}]
    if sctp:
        ports.append({"name": "serve-80-sctp", "containerPort": 80, "protocol": "SCTP"})
    return ports


def policy_id(namespace: str, name: str) -> str:
    """The id in cali-pi-<id>/cali-po-<id> (DESIGN.md); used only to wait for programming.
    A cluster policy's id (cali-ci-/cali-co-) is the same hash of "<kind>/<name>"."""
    return hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:16]


POLICY_CHAIN_PREFIXES = ("cali-pi-", "cali-po-", "cali-ci-", "cali-co-")
POLICY_KINDS = ("networkpolicies", "clusternetworkpolicies", "adminnetworkpolicies", "baselineadminnetworkpolicies")


# --- the world: cluster, pods, probers, labels --------------------------------------------

def port_key(port: tuple[str, int], family: int) -> tuple[str, int]:
    """A matrix's key: ("tcp", 80) for IPv4, ("tcp6", 80) for the same port over IPv6."""
    return (port[0] + ("6" if family == 6 else ""), port[1])


def key_family(key: tuple[str, int]) -> tuple[tuple[str, int], int]:
    return ((key[0][:-1], key[1]), 6) if key[0].endswith("6") else (key, 4)


@dataclass
class World:
    cluster: LabCluster
    sctp: bool
    families: tuple[int, ...] = (4,)  # the pods' IP families; every matrix is probed in each
    pods: dict[str, LabPod] = field(default_factory=dict)
    probers: dict[str, Prober] = field(default_factory=dict)
    node_probers: dict[str, Prober] = field(default_factory=dict)
    pod_labels: dict[str, dict] = field(default_factory=dict)  # current, key -> labels
    ns_labels: dict[str, dict] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.pods)

    @property
    def ports(self) -> list[tuple[str, int]]:
        return [("tcp", 80), ("tcp", 81), ("udp", 80)] + ([("sctp", 80)] if self.sctp else [])

    @property
    def ips(self) -> dict[str, str]:
        """What the cases' policies are written with: "x/a" -> its IPv4 address, and with
        IPv6, "x/a@6" -> its IPv6 address."""
        out = self.ips_of(4) if 4 in self.families else {}
        if 6 in self.families:
            out.update({f"{k}@6": ip for k, ip in self.ips_of(6).items()})
        return out

    def ips_of(self, family: int) -> dict[str, str]:
        return {k: p.ip if family == 4 else p.ip6 for k, p in self.pods.items()}

    @property
    def node_namespaces(self) -> list[str]:
        return [n.ns for n in self.cluster.lab.nodes]

    def pod_doc(self, key: str, labels: dict) -> dict:
        ns, name = key.split("/")
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": NODE_OF[name],
                         "containers": [{"name": "c", "image": "none", "ports": pod_ports(name, self.sctp)}]}}

    @staticmethod
    def ns_doc(ns: str, labels: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}

    @staticmethod
    def base_pod_labels(key: str) -> dict:
        return {"pod": key.split("/")[1]}

    @staticmethod
    def base_ns_labels(ns: str) -> dict:
        return {"ns": ns}

    def set_labels(self, pods: Mapping[str, dict] = {}, namespaces: Mapping[str, dict] = {}) -> None:
        """Labels relative to the base ones ({} = back to base), written in one apply."""
        docs = []
        for key, extra in pods.items():
            self.pod_labels[key] = {**self.base_pod_labels(key), **extra}
            docs.append(self.pod_doc(key, self.pod_labels[key]))
        for ns, extra in namespaces.items():
            self.ns_labels[ns] = {**self.base_ns_labels(ns), **extra}
            docs.append(self.ns_doc(ns, self.ns_labels[ns]))
        if docs:
            self.cluster.apply(docs)

    def ref_pods(self, family: int = 4) -> list[RefPod]:
        out = []
        for key, pod in self.pods.items():
            ports = tuple((p["name"], p["containerPort"], p["protocol"]) for p in pod_ports(pod.name, self.sctp))
            out.append(RefPod(pod.namespace, pod.name, pod.ip if family == 4 else pod.ip6,
                              dict(self.pod_labels[key]), ports))
        return out

    def expected(self, policies: list[dict]) -> dict:
        """Per family: the reference's matrix with the pods' addresses of that family (so an
        ipBlock of the other family matches none of them)."""
        out = {}
        for family in self.families:
            m = expected_matrix(policies, self.ref_pods(family), self.ports, self.ns_labels)
            out.update({port_key(port, family): cells for port, cells in m.items()})
        return out

    def observe(self, timeout: float) -> dict:
        flush_conntrack(self.node_namespaces)
        out = {}
        for family in self.families:
            m = probe_matrix(self.probers, self.ips_of(family), self.ports, timeout)
            out.update({port_key(port, family): cells for port, cells in m.items()})
        return out

    def check(self, policies: list[dict], deadline: float = 20.0) -> int:
        passes, _ = wait_matrix(self.observe, self.expected(policies), self.names, deadline=deadline)
        return passes

    def check_trace(self, policies: list[dict]) -> None:
        """`tortiectl trace` agrees with the matrix just probed on every cell: its library
        (felix_agent.calc.trace, on the records read back from etcd, as the CLI does) for
        all of them, and the command itself, -o json, for one cell."""
        async def load():
            async with EtcdStore.from_endpoint(self.cluster.etcd.endpoint) as store:
                return await load_cluster(store)
        tracer = Tracer(asyncio.run(load()))
        eps = tracer.cluster.endpoint_map()
        ep = {k: eps[tuple(k.split("/"))] for k in self.names}
        traced = {port_key((proto, port), family): {
                      (s, d): OK if tracer.trace(ep[s], ep[d], port, proto, family).allowed else TIMEOUT
                      for s in self.names for d in self.names}
                  for proto, port in self.ports for family in self.families}
        expected = self.expected(policies)  # what the probes just showed, exactly
        diff = matrix_diff(self.names, expected, traced)
        assert not diff, f"tortiectl trace disagrees with the probes:\n{diff}"
        denied = [(s, d, key) for key, cells in expected.items() for (s, d), ok in cells.items() if not ok]
        denied.sort(key=lambda c: -key_family(c[2])[1])  # an IPv6 cell first when there is one
        s, d, key = (denied or [("x/a", "y/b", port_key(("tcp", 80), self.families[-1]))])[0]
        (proto, port), family = key_family(key)
        out = json.loads(self.cluster.tortiectl("trace", s, d, f"{port}/{proto}", "--family", str(family),
                                                "-o", "json").stdout)
        assert out["allowed"] == expected[key][(s, d)] and out["family"] == family, out

    # -- waiting for the agents ------------------------------------------------------

    def filter_chains(self, node_ns: str) -> set[str]:
        """The cali chains of the filter table, of every family the pods have: a chain
        counts once it exists in all of them."""
        found = []
        for family in self.families:
            tool = "iptables" if family == 4 else "ip6tables"
            out = sh(f"{tool}-save", "-t", "filter", ns=node_ns, check=False).stdout
            out += sh(f"{tool}-legacy-save", "-t", "filter", ns=node_ns, check=False).stdout
            found.append(set(re.findall(r"^:(cali-\S+)", out, re.M)))
        return set.intersection(*found)

    def wanted_chains(self, policies: list[dict]) -> dict[str, set[str]]:
        """node ns -> policy chains that must exist there: a policy's chains are programmed
        on every node with a local pod it selects."""
        want: dict[str, set[str]] = {ns: set() for ns in self.node_namespaces}
        for pol in policies:
            if pol["kind"] in CLUSTER_KINDS:
                self._want_cluster_policy(pol, want)
                continue
            ns, spec = pol["metadata"]["namespace"], pol["spec"]
            types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))
            pid = policy_id(ns, pol["metadata"]["name"])
            for key, pod in self.pods.items():
                if pod.namespace == ns and selector_matches(spec.get("podSelector"), self.pod_labels[key]):
                    node_ns = self.cluster.lab.node(pod.node).ns
                    want[node_ns] |= {f"cali-{'pi' if t == 'Ingress' else 'po'}-{pid}" for t in types}
        return want

    def _want_cluster_policy(self, pol: dict, want: dict[str, set[str]]) -> None:
        pid = policy_id(pol["kind"], pol["metadata"]["name"])
        subject = pol["spec"]["subject"]
        chains = {f"cali-{'ci' if d == 'ingress' else 'co'}-{pid}" for d in ("ingress", "egress")
                  if pol["spec"].get(d)}
        for key, pod in self.pods.items():
            ref = RefPod(pod.namespace, pod.name, pod.ip, self.pod_labels[key])
            if tier_peer_matches(subject, ref, self.ns_labels):
                want[self.cluster.lab.node(pod.node).ns] |= chains

    def wait_programmed(self, policies: list[dict], timeout: float = 20) -> None:
        want = self.wanted_chains(policies)
        for node_ns, chains in want.items():
            wait_for(lambda: chains <= self.filter_chains(node_ns), timeout=timeout,
                     what=f"policy chains {sorted(chains)} in {node_ns}")

    def wait_no_policy_chains(self, timeout: float = 20) -> None:
        for node_ns in self.node_namespaces:
            wait_for(lambda: not any(c.startswith(POLICY_CHAIN_PREFIXES) for c in self.any_filter_chains(node_ns)),
                     timeout=timeout, what=f"no policy chains left in {node_ns}")

    def any_filter_chains(self, node_ns: str) -> set[str]:
        """The cali chains of the filter table in any family."""
        out = "".join(sh(f"{tool}-save", "-t", "filter", ns=node_ns, check=False).stdout
                      for tool in ("iptables", "iptables-legacy", "ip6tables", "ip6tables-legacy"))
        return set(re.findall(r"^:(cali-\S+)", out, re.M))

    # -- one case ---------------------------------------------------------------------------

    def run_case(self, case: "Case") -> None:
        """Apply the case's policies, check the matrix, then each step; clean up after."""
        policies = case.policies(self.ips)
        ok = False
        try:
            self.set_labels(case.pod_labels, case.ns_labels)
            self.cluster.apply(policies)
            self.wait_programmed(policies)
            passes = self.check(policies)
            self.check_trace(policies)
            print(f"{case.name}: matrix as expected after {passes} pass(es), and so is tortiectl trace")
            for step in case.steps:
                self.set_labels(step.pod_labels, step.ns_labels)
                for name in step.delete:
                    doomed = next(p for p in policies if p["metadata"]["name"] == name)
                    self.cluster.delete(doomed["kind"].lower(), name, doomed["metadata"].get("namespace", ""))
                policies = [p for p in policies if p["metadata"]["name"] not in step.delete]
                self.wait_programmed(policies)
                passes = self.check(policies)
                self.check_trace(policies)
                print(f"{case.name} / {step.what}: matrix as expected after {passes} pass(es), and trace")
            ok = True
        finally:
            # After a failure, clear whatever is in the datastore, not just what we know of.
            self.reset(policies if ok else None)

    # -- cleanup between cases -----------------------------------------------------------

    def reset(self, policies: list[dict] | None = None) -> None:
        """Delete the given policies (None: every policy in the datastore), restore every
        label, and wait until everything reaches everything again (so deletion restores
        access, and cases stay independent)."""
        if policies is None:
            policies = []
            for kind in POLICY_KINDS:
                listed = json.loads(self.cluster.tortiectl("get", kind, "-o", "json").stdout)
                policies += listed.get("items", [])
        if policies:
            self.cluster.tortiectl("delete", "-f", "-", input="\n---\n".join(json.dumps(p) for p in policies),
                                   check=False)
        changed_pods = {k: {} for k in self.pods if self.pod_labels[k] != self.base_pod_labels(k)}
        changed_ns = {n: {} for n in NAMESPACES if self.ns_labels[n] != self.base_ns_labels(n)}
        self.set_labels(changed_pods, changed_ns)
        self.wait_no_policy_chains()
        self.check([])


@pytest.fixture(scope="module")
def world(lab_prefix, tmp_path_factory):
    yield from build_world(f"{lab_prefix}-np", str(tmp_path_factory.mktemp("netpol")))


def build_world(prefix: str, workdir: str, pool6: str = "", ipv4: bool = True):
    """The module's world (a generator for a fixture): IPv4 pods, or dual-stack ones on a
    dual-stack underlay when `pool6` is an IPv6 pool (IPv6-only ones without `ipv4`)."""
    if not is_root():
        pytest.skip("needs root for network namespaces")
    etcd = Etcd()
    lab = Lab(prefix=prefix)
    try:
        etcd.start()
        lab.build(2, ipv6=bool(pool6))
        c = LabCluster(lab, etcd, workdir)
        if ipv4:
            c.apply_pool(POOL)
        if pool6:
            c.apply_pool(pool6, name="pool6", block_size=122)
        c.start_agents()
        families = ((4,) if ipv4 else ()) + ((6,) if pool6 else ())
        w = World(c, sctp=sctp_available(lab, lab.nodes[0].ns), families=families)
        for ns in NAMESPACES:
            w.ns_labels[ns] = w.base_ns_labels(ns)
        keys = [f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES]
        for k in keys:
            w.pod_labels[k] = w.base_pod_labels(k)
        c.apply([w.ns_doc(ns, w.ns_labels[ns]) for ns in NAMESPACES] + [w.pod_doc(k, w.pod_labels[k]) for k in keys])
        for k in keys:
            ns, name = k.split("/")
            pod = c.add_pod(ns, name, NODE_OF[name], register=False, serve=["tcp:80", "tcp:81", "udp:80"])
            w.pods[k] = pod
            w.probers[k] = Prober(lab, pod.ns, k, serve_sctp=80 if w.sctp else None)
        for n in lab.nodes:
            w.node_probers[n.name] = Prober(lab, n.ns, n.name)
        # BGP must have converged before cross-node pairs can answer.
        w.check([], deadline=60)
        yield w
    finally:
        lab.teardown()
        etcd.close()


# --- the cases -----------------------------------------------------------------------------

def ml(**labels) -> dict:
    return {"matchLabels": labels}


def mx(key: str, op: str, *values: str) -> dict:
    e = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


def pol(name: str, ns: str, pod: dict | None = None, *, ingress: list | None = None,
        egress: list | None = None, types: list | None = None) -> dict:
    spec: dict = {"podSelector": pod or {}}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if types is not None:
        spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def host(ip: str) -> str:
    return f"{ip}/32"


@dataclass(frozen=True)
class Step:
    """A change after the policies are in place, then a new exact check."""

    what: str
    pod_labels: Mapping[str, dict] = field(default_factory=dict)  # relative to base
    ns_labels: Mapping[str, dict] = field(default_factory=dict)
    delete: tuple[str, ...] = ()  # names of this case's policies to delete


@dataclass(frozen=True)
class Case:
    name: str
    policies: Callable[[dict[str, str]], list[dict]]  # pod ips -> policy dicts
    pod_labels: Mapping[str, dict] = field(default_factory=dict)  # set before the policies
    ns_labels: Mapping[str, dict] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()
    needs_sctp: bool = False


A = ml(pod="a")
ALL_NS = {"namespaceSelector": {}}

CASES = [
    # default deny and policyTypes
    Case("deny-all-ingress", lambda ip: [pol("deny", "x", types=["Ingress"])]),
    Case("deny-all-ingress-policy-types-omitted", lambda ip: [pol("deny", "x")]),
    Case("deny-all-egress", lambda ip: [pol("deny", "x", types=["Egress"])]),
    Case("deny-all-both-directions", lambda ip: [pol("deny", "x", types=["Ingress", "Egress"])]),
    Case("egress-rules-imply-egress-type", lambda ip: [
        pol("e", "x", egress=[{"to": [{"namespaceSelector": ml(ns="y")}]}])]),
    Case("egress-type-only-leaves-ingress-open", lambda ip: [
        pol("e", "y", ingress=[{"from": [{"podSelector": A}]}], egress=[{"to": [ALL_NS]}], types=["Egress"])]),
    # allow-all and unions
    Case("allow-all-ingress", lambda ip: [pol("allow", "x", ingress=[{}])]),
    Case("deny-all-plus-allow-all-is-union", lambda ip: [
        pol("deny", "x", types=["Ingress"]), pol("allow", "x", ingress=[{}])]),
    Case("allow-all-egress-under-deny-egress", lambda ip: [
        pol("deny", "x", types=["Egress"]), pol("allow", "x", egress=[{}], types=["Egress"])]),
    Case("two-policies-one-pod-union", lambda ip: [
        pol("p1", "x", A, ingress=[{"from": [{"podSelector": ml(pod="b")}]}]),
        pol("p2", "x", A, ingress=[{"from": [{"namespaceSelector": ml(ns="y")}], "ports": [{"port": 81}]}])]),
    Case("policies-in-every-namespace", lambda ip: [
        pol("dx", "x", types=["Ingress"]),
        pol("dy", "y", ingress=[{"from": [{"namespaceSelector": ml(ns="z")}]}]),
        pol("dz", "z", egress=[{"to": [{"namespaceSelector": ml(ns="x")}]}], types=["Egress"])]),
    Case("egress-deny-beats-ingress-allow", lambda ip: [
        pol("deny-egress", "x", types=["Egress"]), pol("allow-in", "y", ingress=[{}])]),
    Case("ingress-and-egress-in-one-policy", lambda ip: [
        pol("both", "y", ml(pod="b"), ingress=[{"from": [{"namespaceSelector": ml(ns="x")}]}],
            egress=[{"to": [{"namespaceSelector": ml(ns="z")}]}], types=["Ingress", "Egress"])]),
    # pod selectors
    Case("peer-pod-selector-match-labels", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": ml(pod="b")}]}])]),
    Case("peer-pod-selector-in", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": mx("pod", "In", "b", "c")}]}])]),
    Case("peer-pod-selector-notin", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": mx("pod", "NotIn", "b")}]}])]),
    Case("peer-pod-selector-exists", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": mx("tier", "Exists"), **ALL_NS}]}])],
        pod_labels={"x/b": {"tier": "web"}, "y/c": {"tier": "db"}}),
    Case("peer-pod-selector-does-not-exist", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": mx("tier", "DoesNotExist")}]}])],
        pod_labels={"x/b": {"tier": "web"}}),
    Case("target-selector-does-not-exist", lambda ip: [
        pol("p", "x", mx("tier", "DoesNotExist"), types=["Ingress"])], pod_labels={"x/b": {"tier": "web"}}),
    Case("target-selector-in", lambda ip: [pol("p", "x", mx("pod", "In", "a", "b"), types=["Ingress"])]),
    Case("empty-peer-pod-selector-is-own-namespace", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": {}}]}])]),
    # namespace selectors, AND versus OR
    Case("peer-namespace-selector", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"namespaceSelector": ml(ns="y")}]}])]),
    Case("peer-namespace-selector-notin", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"namespaceSelector": mx("ns", "NotIn", "x")}]}])]),
    Case("peer-namespace-selector-metadata-name", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"namespaceSelector": mx(NS_NAME_LABEL, "In", "y", "z")}]}])]),
    Case("namespace-and-pod-selector-in-one-peer-is-and", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"namespaceSelector": ml(ns="y"), "podSelector": ml(pod="b")}]}])]),
    Case("namespace-or-pod-selector-as-two-peers", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"namespaceSelector": ml(ns="y")}, {"podSelector": ml(pod="b")}]}])]),
    Case("empty-namespace-selector-is-every-pod", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [ALL_NS], "ports": [{"port": 80}]}])]),
    Case("empty-namespace-selector-with-pod-selector", lambda ip: [
        pol("p", "x", ingress=[{"from": [{**ALL_NS, "podSelector": A}]}])]),
    # ipBlock
    Case("ip-block-with-except", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"ipBlock": {"cidr": POOL, "except": [host(ip["y/a"]), host(ip["z/c"])]}}]}])]),
    Case("ip-block-one-pod", lambda ip: [pol("p", "x", ingress=[{"from": [{"ipBlock": {"cidr": host(ip["z/c"])}}]}])]),
    Case("ip-block-everything-except-one", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [host(ip["x/b"])]}}]}])]),
    Case("egress-ip-block", lambda ip: [
        pol("p", "x", A, egress=[{"to": [{"ipBlock": {"cidr": host(ip["y/c"])}}]}], types=["Egress"])]),
    Case("egress-ip-block-with-except", lambda ip: [
        pol("p", "x", egress=[{"to": [{"ipBlock": {"cidr": POOL, "except": [host(ip["y/c"]), host(ip["z/c"])]}}]}],
            types=["Egress"])]),
    # ports
    Case("port-number-tcp-default", lambda ip: [pol("p", "x", ingress=[{"ports": [{"port": 80}]}])]),
    Case("port-udp", lambda ip: [pol("p", "x", ingress=[{"ports": [{"protocol": "UDP", "port": 80}]}])]),
    Case("protocol-without-port", lambda ip: [pol("p", "x", ingress=[{"ports": [{"protocol": "UDP"}]}])]),
    Case("two-ports-in-one-rule", lambda ip: [
        pol("p", "x", ingress=[{"from": [ALL_NS], "ports": [{"port": 80}, {"port": 81}]}])]),
    Case("end-port-range", lambda ip: [pol("p", "x", ingress=[{"ports": [{"port": 80, "endPort": 81}]}])]),
    Case("end-port-range-from-81", lambda ip: [pol("p", "x", ingress=[{"ports": [{"port": 81, "endPort": 90}]}])]),
    Case("named-port", lambda ip: [pol("p", "x", ingress=[{"ports": [{"port": "serve-81-tcp"}]}])]),
    Case("named-port-udp", lambda ip: [
        pol("p", "x", ingress=[{"ports": [{"protocol": "UDP", "port": "serve-80-udp"}]}])]),
    Case("named-port-resolves-per-destination", lambda ip: [pol("p", "x", ingress=[{"ports": [{"port": "web"}]}])]),
    Case("named-port-with-the-wrong-protocol", lambda ip: [
        pol("p", "x", ingress=[{"ports": [{"protocol": "UDP", "port": "serve-80-tcp"}]}])]),
    Case("sctp-port", lambda ip: [pol("p", "x", ingress=[{"ports": [{"protocol": "SCTP", "port": 80}]}])],
         needs_sctp=True),
    # egress
    Case("egress-to-namespace", lambda ip: [
        pol("p", "x", egress=[{"to": [{"namespaceSelector": ml(ns="y")}]}], types=["Egress"])]),
    Case("egress-dns-like-ports-to-anywhere", lambda ip: [
        pol("p", "x", egress=[{"ports": [{"protocol": "UDP", "port": 80}, {"protocol": "TCP", "port": 53}]}],
            types=["Egress"])]),
    Case("egress-pod-and-port", lambda ip: [
        pol("p", "x", A, egress=[{"to": [{"namespaceSelector": ml(ns="z"), "podSelector": ml(pod="c")}],
                                  "ports": [{"protocol": "UDP", "port": 80}]}], types=["Egress"])]),
    Case("egress-named-port-to-peers", lambda ip: [
        pol("p", "x", egress=[{"to": [{"namespaceSelector": ml(ns="y")}], "ports": [{"port": "web"}]}],
            types=["Egress"])]),
    Case("egress-named-port-to-anywhere", lambda ip: [
        pol("p", "x", egress=[{"ports": [{"port": "web"}]}], types=["Egress"])]),
    # changes after the policy exists
    Case("pod-label-change-of-a-peer", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"podSelector": ml(role="friend")}]}])],
        steps=(Step("x/c becomes a friend", pod_labels={"x/c": {"role": "friend"}}),
               Step("x/b too, x/c stops", pod_labels={"x/b": {"role": "friend"}, "x/c": {}}))),
    Case("namespace-label-change", lambda ip: [
        pol("p", "x", A, ingress=[{"from": [{"namespaceSelector": ml(team="blue")}]}])],
        steps=(Step("z joins team blue", ns_labels={"z": {"team": "blue"}}),
               Step("z leaves again", ns_labels={"z": {}}))),
    Case("pod-label-change-of-the-target", lambda ip: [
        pol("lock", "x", ml(role="locked"), types=["Ingress", "Egress"])],
        steps=(Step("x/b gets locked", pod_labels={"x/b": {"role": "locked"}}),
               Step("x/b moves to x/c", pod_labels={"x/b": {}, "x/c": {"role": "locked"}}))),
    Case("deleting-one-policy-of-two", lambda ip: [
        pol("deny", "x", types=["Ingress"]),
        pol("allow-y", "x", ingress=[{"from": [{"namespaceSelector": ml(ns="y")}]}])],
        steps=(Step("allow-y deleted", delete=("allow-y",)),)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_truth_table(world: World, case: Case):
    if case.needs_sctp and not world.sctp:
        pytest.skip("the kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) failed in a lab namespace)")
    world.run_case(case)


# --- beyond the matrix: new pods, the node itself, spoofed sources ---------------------------

def test_pod_created_after_the_policy_is_protected_from_its_first_packet(world: World):
    """CNI ADD answers only once the pod's chains exist: probes sent the moment ADD returns
    (no waiting) already see the policy, on the same node and across nodes."""
    check_late_pod(world, [
        pol("late", "x", ml(pod="late"), ingress=[{"from": [{"podSelector": A}]}],
            egress=[{"to": [{"podSelector": A}]}], types=["Ingress", "Egress"]),
        # Selects x/c on node2 and allows it everything: its chain appearing on node2
        # tells us node2's agent has this batch of policies before the pod exists.
        pol("sentinel", "x", ml(pod="c"), ingress=[{}])])


def check_late_pod(world: World, policies: list[dict]) -> None:
    """`policies` let a new pod x/late (labels pod=late, on node2) talk with x/a only, both
    ways, and include one selecting x/c so node2 programs them before the pod exists; the
    pod is then created and probed the moment its CNI ADD returns."""
    c, lab = world.cluster, world.cluster.lab
    doc = world.pod_doc("x/c", {"pod": "late"})  # shaped like x/c (node2, its ports), named late
    doc["metadata"]["name"] = "late"
    node2 = lab.node("node2")
    late = None
    try:
        c.apply(policies)
        world.wait_programmed(policies)
        c.apply(doc)
        # The pod's namespace, server and prober exist before its network does, as in a
        # real pod sandbox; ADD is the last step and nothing waits after it.
        ns = lab.add_pod_ns("x-late")
        late = LabPod("x", "late", "node2", ns, "", f"c-x-late-{time.monotonic_ns()}")
        c.serve(late, ["tcp:80", "udp:80"])
        late_prober = Prober(lab, ns, "x/late")
        p = c.cni_run(node2, "ADD", late.container_id, f"/var/run/netns/{ns}", "x", "late")
        assert p.returncode == 0, p.stdout + p.stderr
        late.ip = json.loads(p.stdout)["ips"][0]["address"].split("/")[0]
        ip = world.ips
        pr = world.probers
        batches = {
            "x/a": (pr["x/a"], [Probe(late.ip, 80, "tcp", 3.0)]),  # allowed, cross-node
            "x/b": (pr["x/b"], [Probe(late.ip, 80, "tcp", 1.0), Probe(late.ip, 80, "udp", 1.0)]),
            "x/c": (pr["x/c"], [Probe(late.ip, 80, "tcp", 1.0)]),  # same node
            "y/a": (pr["y/a"], [Probe(late.ip, 80, "tcp", 1.0)]),
            "late": (late_prober, [Probe(ip["x/a"], 80, "tcp", 3.0), Probe(ip["x/b"], 80, "tcp", 1.0),
                                   Probe(ip["x/c"], 80, "tcp", 1.0), Probe(ip["y/c"], 80, "udp", 1.0)]),
        }
        got = run_batches(batches)
        assert got == {"x/a": [OK], "x/b": [TIMEOUT, TIMEOUT], "x/c": [TIMEOUT], "y/a": [TIMEOUT],
                       "late": [OK, TIMEOUT, TIMEOUT, TIMEOUT]}
    finally:
        if late is not None:
            c.cni_run(node2, "DEL", late.container_id, f"/var/run/netns/{late.ns}", "x", "late")
        c.tortiectl("delete", "pod", "late", "-n", "x", check=False)
        world.reset(policies)


def test_node_reaches_its_own_pods_under_default_deny(world: World):
    """Kubelet probes: a node always reaches the pods it hosts, even when every namespace
    denies all ingress and egress.  A remote node's traffic is pod-to-pod-like and stays
    denied (Calico's behaviour; Kubernetes leaves it open to the implementation)."""
    policies = [pol("deny-all", ns, types=["Ingress", "Egress"]) for ns in NAMESPACES]
    try:
        world.cluster.apply(policies)
        world.wait_programmed(policies)
        world.check(policies)  # pods reach nothing but themselves
        batches, expect = {}, {}
        for node in world.cluster.lab.nodes:
            probes, want = [], []
            for key, pod in world.pods.items():
                local = pod.node == node.name
                for proto, port in world.ports:
                    probes.append(Probe(pod.ip, port, proto, 0.5 if not local else 3.0))
                    want.append(OK if local else TIMEOUT)
            batches[node.name] = (world.node_probers[node.name], probes)
            expect[node.name] = want
        flush_conntrack(world.node_namespaces)
        assert run_batches(batches) == expect
    finally:
        world.reset(policies)


def test_spoofed_source_is_dropped_at_the_sender(world: World):
    """Anti-spoofing: x/a (node1) sends to y/c (node2) from an address it does not own, a
    free pool address and its neighbour x/b's: the anti-spoofing DROP of
    cali-from-wl-dispatch on node1 counts the packets and node2 never sees them; the same probe from its own address
    passes.  No policy is involved: this holds for every pod."""
    check_spoofing(world, 4, "10.65.250.250")


def check_spoofing(world: World, family: int, free_address: str) -> None:
    """The spoofing test above over IP `family` (`free_address`: one of no pod's)."""
    src, dst = world.pods["x/a"], world.pods["y/c"]
    addr = (lambda p: p.ip) if family == 4 else (lambda p: p.ip6)
    bits, tool, ip = (32, "iptables", ["ip"]) if family == 4 else (128, "ip6tables", ["ip", "-6"])
    node1, node2 = (world.cluster.lab.node(n).ns for n in ("node1", "node2"))
    spoofs = [free_address, addr(world.pods["x/b"])]
    counters = [["-t", "raw", "-I", "PREROUTING", "-s", f"{a}/{bits}", "-d", f"{addr(dst)}/{bits}"] for a in spoofs]
    added: list[list[str]] = []
    try:
        for a in spoofs:
            sh(*ip, "addr", "add", f"{a}/{bits}", "dev", "eth0", *(["nodad"] if family == 6 else []), ns=src.ns)
        for rule in counters:
            sh(tool, *rule, ns=node2)  # counting rules only (no target), node2 only
            added.append(rule)
        before = anti_spoof_drops(node1, family)
        flush_conntrack(world.node_namespaces)
        probes = [Probe(addr(dst), port, proto, 1.0, src=a) for a in spoofs for proto, port in (("tcp", 80), ("udp", 80))]
        probes.append(Probe(addr(dst), 80, "tcp", 3.0, src=addr(src)))  # its own address
        assert world.probers["x/a"].run(probes) == [TIMEOUT] * 4 + [OK]
        dropped = anti_spoof_drops(node1, family) - before
        assert dropped >= 4, f"the anti-spoofing DROP counted {dropped} packets, expected the 4 spoofed ones"
        raw = sh(f"{tool}-save", "-c", "-t", "raw", ns=node2).stdout
        seen = [int(n) for n in re.findall(r"^\[(\d+):\d+\] -A PREROUTING -s \S+ -d \S+$", raw, re.M)]
        assert len(seen) == 2 and seen == [0, 0], f"spoofed packets reached node2: {raw}"
        print(f"IPv{family} anti-spoofing: {dropped} spoofed packets dropped on node1, 0 reached node2")
    finally:
        for rule in added:
            sh(tool, *["-D" if r == "-I" else r for r in rule], ns=node2, check=False)
        for a in spoofs:
            sh(*ip, "addr", "del", f"{a}/{bits}", "dev", "eth0", ns=src.ns, check=False)
