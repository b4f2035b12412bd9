"""A synthetic cluster for the scale benchmark, built from tortie's own record types.

    cluster(pods=10_000, nodes=500, policies=1_000) -> Synthetic

The first node (LOCAL_NODE, the one the measured agent runs as) holds 110 pods, the
kubelet's default maximum; the rest are spread evenly over the other nodes.  Every node
owns two /26 blocks of one pool (affinities in etcd mode, spec.podCIDRs in kubernetes mode)
and pods take addresses from their node's blocks.  Namespaces hold ~100 pods each, with
team/env labels; pods carry app/tier/version labels and a named port.  Policies cycle
through a realistic mix: default deny, same-app ingress on a named port, ingress from a
namespace selector + pod selector, egress to an ipBlock with an except, and egress to a
tier in any namespace.  Everything is deterministic (no randomness): the same sizes give
the same records, so the stand-in API server and the agent side can each build them.

`changes(kind, i)` gives the i-th change of each measured kind (remote pod label, remote
pod add, local pod add, policy change, node add) as records to write.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from podnet.naming import host_iface_name
from felix_agent.model import (
    BlockAffinity,
    IPBlock,
    IPPool,
    LabelSelector,
    NamedPort,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
    Record,
    SelectorRequirement,
    WorkloadEndpoint,
)

LOCAL_NODE = "node-00000"
LOCAL_PODS = 110
POOL = "10.64.0.0/12"  # 2 /26 blocks a node: 8,192 nodes fit
BLOCK_SIZE = 26
APPS_PER_NS = 8
CHANGE_KINDS = ("remote pod label", "remote pod add", "local pod add", "policy change", "node add")

_POOL_BASE = int(ipaddress.IPv4Network(POOL).network_address)


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def block_cidr(node_index: int, j: int) -> str:
    base = _POOL_BASE + (node_index * 2 + j) * 64
    return f"{ipaddress.IPv4Address(base)}/{BLOCK_SIZE}"


def pod_ip(node_index: int, slot: int) -> str:
    """Slot 0.. of the node's two blocks, skipping each block's first and last address
    (the tunnel address and broadcast, which IPAM never hands out)."""
    block, off = divmod(slot, 62)
    return str(ipaddress.IPv4Address(_POOL_BASE + (node_index * 2 + block) * 64 + 1 + off))


@dataclass
class Synthetic:
    n_pods: int
    n_nodes: int
    n_policies: int
    pool_mode: str = "bgp"
    kubernetes: bool = False  # pod CIDRs on Nodes, no WorkloadEndpoints, no affinities

    def __post_init__(self) -> None:
        self.n_namespaces = max(10, self.n_pods // 100)
        self._slots: dict[int, int] = {}

    # --- the cluster ---

    def pool(self) -> IPPool:
        return IPPool("default-pool", POOL, BLOCK_SIZE, mode=self.pool_mode)  # type: ignore[arg-type]

    def namespace(self, i: int) -> Namespace:
        return Namespace(f"ns-{i:04d}", (("env", ("prod", "staging", "dev")[i % 3]), ("team", f"t{i % 25}")))

    def node(self, i: int) -> Node:
        # 4,000 nodes per /20 subnet: most peers share a subnet, some are behind a router.
        ip = f"172.{16 + i // 4000}.{(i % 4000) // 250}.{i % 250 + 1}/20"
        cidrs = (block_cidr(i, 0), block_cidr(i, 1)) if self.kubernetes else ()
        return Node(node_name(i), ip=ip, pod_cidrs=cidrs,
                    labels=(("kubernetes.io/hostname", node_name(i)),
                            ("topology.kubernetes.io/zone", f"zone-{i % 3}")))

    def node_of_pod(self, p: int) -> int:
        if p < LOCAL_PODS or self.n_nodes == 1:
            return 0
        return 1 + (p - LOCAL_PODS) % (self.n_nodes - 1)

    def pod(self, p: int, *, node_index: int | None = None, slot: int | None = None) -> Pod:
        ns = p % self.n_namespaces
        app = (p // self.n_namespaces) % APPS_PER_NS
        n = self.node_of_pod(p) if node_index is None else node_index
        if slot is None:
            slot = p if n == 0 else (p - LOCAL_PODS) // max(1, self.n_nodes - 1)
        return Pod(f"ns-{ns:04d}", f"app{app}-{p:06d}",
                   labels=(("app", f"app{app}"), ("pod-template-hash", f"h{p % 1000:03d}"),
                           ("tier", ("web", "api", "db")[app % 3]), ("version", f"v{p % 3}")),
                   node=node_name(n), ips=(pod_ip(n, slot),),
                   ports=(NamedPort("http", 8080), NamedPort("metrics", 9090)),
                   uid=f"uid-{p:06d}")

    def wep(self, pod: Pod) -> WorkloadEndpoint:
        return WorkloadEndpoint(pod.namespace, pod.name, pod.node, f"cid-{pod.uid}",
                                host_iface_name(pod.namespace, pod.name), pod.ips)

    def local_weps(self) -> list[WorkloadEndpoint]:
        """This node's wired pods (an agent adopts them from its IPAM records at start)."""
        return [self.wep(self.pod(p)) for p in range(min(LOCAL_PODS, self.n_pods))]

    def policy(self, j: int, variant: int = 0) -> NetworkPolicy:
        ns = f"ns-{j % self.n_namespaces:04d}"
        app = f"app{(j // self.n_namespaces) % APPS_PER_NS}"
        kind = j % 5
        # variant > 0: a changed policy (another port), never equal to the original
        port = PolicyPort("TCP", "http") if variant == 0 else PolicyPort("TCP", 8000 + variant)
        if kind == 0:
            return NetworkPolicy(ns, f"default-deny-{j}", LabelSelector(), policy_types=("Ingress",))
        if kind == 1:
            rule = PolicyRule(peers=(PolicyPeer(pod_selector=LabelSelector((("app", app),))),),
                              ports=(port,))
            return NetworkPolicy(ns, f"same-app-{j}", LabelSelector((("app", app),)), ingress=(rule,))
        if kind == 2:
            rule = PolicyRule(peers=(PolicyPeer(
                pod_selector=LabelSelector((("tier", "web"),)),
                namespace_selector=LabelSelector((("team", f"t{j % 25}"),))),),
                ports=(PolicyPort("TCP", 8080), PolicyPort("TCP", "metrics")))
            return NetworkPolicy(ns, f"from-team-{j}", LabelSelector((("app", app),)), ingress=(rule,))
        if kind == 3:
            rule = PolicyRule(peers=(PolicyPeer(ip_block=IPBlock("10.0.0.0/8", (POOL,))),),
                              ports=(PolicyPort("TCP", 443),))
            return NetworkPolicy(ns, f"egress-out-{j}", LabelSelector((("app", app),)), egress=(rule,),
                                 policy_types=("Egress",))
        sel = LabelSelector(match_expressions=(SelectorRequirement("tier", "In", ("api", "db")),))
        rule = PolicyRule(peers=(PolicyPeer(pod_selector=LabelSelector((("tier", "db"),)),
                                            namespace_selector=LabelSelector(
                                                (("env", ("prod", "staging", "dev")[j % 3]),))),),
                          ports=(port,))
        return NetworkPolicy(ns, f"to-db-{j}", sel, egress=(rule,), policy_types=("Egress",))

    def records(self):
        """Every record of the cluster, in the order a datastore loads them."""
        yield self.pool()
        for i in range(self.n_nodes):
            yield self.node(i)
        if not self.kubernetes:
            for i in range(self.n_nodes):
                for j in (0, 1):
                    yield BlockAffinity(block_cidr(i, j), node_name(i), "default-pool")
        for i in range(self.n_namespaces):
            yield self.namespace(i)
        for p in range(self.n_pods):
            pod = self.pod(p)
            yield pod
            if not self.kubernetes:
                yield self.wep(pod)  # every agent publishes the endpoints it wired
        for j in range(self.n_policies):
            yield self.policy(j)

    # --- changes ---

    def change(self, kind: str, i: int) -> list[Record]:
        """The i-th change of `kind` (records to write; each differs from the cluster)."""
        if kind == "remote pod label":
            pod = self.pod(LOCAL_PODS + 7 * i + 3)
            labels = tuple(sorted(dict(pod.labels, app=f"app{(i + 1) % APPS_PER_NS}",
                                       version=f"x{i}").items()))
            return [replace(pod, labels=labels)]
        if kind == "remote pod add":
            p = self.n_pods + i
            pod = self.pod(p, node_index=1 + i % max(1, self.n_nodes - 1), slot=120)
            pod = replace(pod, ips=(pod_ip(1 + i % max(1, self.n_nodes - 1), 100 + i // self.n_nodes),))
            return [pod] if self.kubernetes else [pod, self.wep(pod)]
        if kind == "local pod add":
            # A pod bound to this node (its CNI ADD comes later): chains before the ADD.
            p = self.n_pods + 1000 + i
            return [replace(self.pod(p, node_index=0, slot=LOCAL_PODS + i), ips=())]
        if kind == "policy change":
            return [self.policy(5 * i + 1, variant=i + 1)]
        if kind == "node add":
            k = self.n_nodes + i
            node = self.node(k)
            return [node] if self.kubernetes else [node, BlockAffinity(block_cidr(k, 0), node.name,
                                                                      "default-pool")]
        raise ValueError(f"unknown change kind {kind!r}")


SIZES = {
    "10k": (10_000, 500, 1_000),
    "50k": (50_000, 2_500, 5_000),
    "100k": (100_000, 5_000, 10_000),
}
