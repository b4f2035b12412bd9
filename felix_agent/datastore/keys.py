"""The etcd key layout: every object as JSON (Kubernetes-shaped) under one prefix.

    <prefix>/<plural>/<namespace>/<name>   namespaced kinds (Pod, NetworkPolicy)
    <prefix>/<plural>/<name>               cluster kinds (Node, Namespace, IPPool, BGPPeer, the cluster policies)
    <prefix>/workloadendpoints/<node>/<namespace>/<pod>
    <prefix>/blockaffinities/<cidr with '/' as '-'>   claimed with a create-only transaction

The Syncer watches the whole prefix, so block claims and workload endpoints reach every
node as ordinary model events.
"""
from __future__ import annotations

DEFAULT_PREFIX = "/tortie"

PLURAL = {
    "Pod": "pods",
    "Namespace": "namespaces",
    "Node": "nodes",
    "NetworkPolicy": "networkpolicies",
    "ClusterNetworkPolicy": "clusternetworkpolicies",
    "AdminNetworkPolicy": "adminnetworkpolicies",
    "BaselineAdminNetworkPolicy": "baselineadminnetworkpolicies",
    "IPPool": "ippools",
    "BGPPeer": "bgppeers",
    "WorkloadEndpoint": "workloadendpoints",
    "BlockAffinity": "blockaffinities",
}
KIND_OF_PLURAL = {v: k for k, v in PLURAL.items()}
NAMESPACED = {"Pod", "NetworkPolicy"}


def object_key(prefix: str, kind: str, name: str, namespace: str = "") -> str:
    """The key of an object; `name` of a WorkloadEndpoint is "<node>/<namespace>/<pod>",
    of a BlockAffinity its CIDR."""
    plural = PLURAL[kind]
    if kind == "BlockAffinity":
        name = name.replace("/", "-")
    if kind in NAMESPACED:
        if not namespace:
            raise ValueError(f"{kind} {name!r} needs a namespace")
        return f"{prefix}/{plural}/{namespace}/{name}"
    return f"{prefix}/{plural}/{name}"


def kind_of_key(prefix: str, key: str) -> str | None:
    """The kind an etcd key holds, or None for keys that are not model objects."""
    if not key.startswith(prefix + "/"):
        return None
    plural = key[len(prefix) + 1:].split("/", 1)[0]
    return KIND_OF_PLURAL.get(plural)


def record_key_of(prefix: str, kind: str, key: str) -> str:
    """The record key (model `.key`) an etcd key of `kind` holds: object_key backwards
    ("<prefix>/pods/ns/name" -> "ns/name"; a BlockAffinity's "10.65.1.0-26" -> its CIDR).
    The syncer finds a deleted key's record this way instead of keeping every key."""
    name = key[len(prefix) + len(PLURAL[kind]) + 2:]
    if kind == "BlockAffinity":
        net, _, bits = name.rpartition("-")
        return f"{net}/{bits}"
    return name
