"""Kubernetes-shaped objects <-> the typed model records (felix_agent.model).

Both datastores and tortiectl go through here, so an object means the same thing wherever
it came from:

- `from_k8s(obj)` turns a Pod, Namespace, Node or NetworkPolicy in the real API shape
  (exactly what kube-apiserver v1.28 returns), or one of tortie's own kinds (IPPool,
  BGPPeer, WorkloadEndpoint, BlockAffinity, apiVersion "tortie.io/v1"), into a record.
  Invalid input raises `ConvertError` naming the object and the field.
- `to_k8s(record)` is the inverse, for every kind: the etcd backend stores this shape, and
  `from_k8s(to_k8s(r)) == r` holds for every valid record.

NetworkPolicy is validated the way the API server validates it (tortiectl applies YAML
nobody else has checked); the other built-in kinds are taken as the API server gives
them, with only the fields tortie reads checked.
"""
from __future__ import annotations

from typing import Callable

from felix_agent import model
from felix_agent.datastore.convert.builtin import namespace_from_k8s, node_from_k8s, pod_from_k8s, namespace_k8s, node_k8s, pod_k8s
from felix_agent.datastore.convert.cluster_policy import cluster_policy_from_k8s, cluster_policy_k8s
from felix_agent.datastore.convert.common import API_VERSION, ConvertError, Ctx
from felix_agent.datastore.convert.own import (
    bgp_peer_from_k8s, block_affinity_from_k8s, ip_pool_from_k8s, workload_endpoint_from_k8s, bgp_peer_k8s, block_affinity_k8s,
    block_name, ip_pool_k8s, wep_name, workload_endpoint_k8s,
)
from felix_agent.datastore.convert.policy import network_policy_from_k8s, network_policy_k8s
from felix_agent.model import (
    BGPPeer, BlockAffinity, ClusterPolicy, IPPool, Namespace, NetworkPolicy, Node, Pod, Record, WorkloadEndpoint,
)

__all__ = ["API_VERSION", "ConvertError", "block_name", "from_k8s", "key_from_k8s", "kind_of", "to_k8s",
           "wep_name"]

_FROM: dict[str, Callable[[Ctx, dict], Record]] = {
    "Pod": pod_from_k8s, "Namespace": namespace_from_k8s, "Node": node_from_k8s, "NetworkPolicy": network_policy_from_k8s,
    "IPPool": ip_pool_from_k8s, "BGPPeer": bgp_peer_from_k8s, "WorkloadEndpoint": workload_endpoint_from_k8s,
    "BlockAffinity": block_affinity_from_k8s, "ClusterNetworkPolicy": cluster_policy_from_k8s,
    "AdminNetworkPolicy": cluster_policy_from_k8s, "BaselineAdminNetworkPolicy": cluster_policy_from_k8s,
}


def from_k8s(obj: dict, kind: str | None = None) -> Record:
    """The record for a Kubernetes-shaped object. `kind` is for list items, which the API
    server sends without their own kind/apiVersion. Raises ConvertError."""
    if not isinstance(obj, dict):
        raise ConvertError(f"object must be a mapping, got {type(obj).__name__}")
    kind = obj.get("kind") or kind
    if not kind:
        raise ConvertError("object has no kind")
    ctx = Ctx(str(kind), obj)
    if kind not in _FROM:
        raise ctx.fail("kind", f"{kind!r} is not one of {', '.join(sorted(_FROM))}")
    api = obj.get("apiVersion")
    if api and api != API_VERSION[kind]:
        raise ctx.fail("apiVersion", f"{api!r} is not {API_VERSION[kind]!r}")
    try:
        return _FROM[kind](ctx, obj)
    except ConvertError:
        raise
    except (TypeError, AttributeError, KeyError) as e:  # shapes the checks above missed
        raise ctx.fail("", f"malformed object ({type(e).__name__}: {e})") from None


def kind_of(record: Record) -> str:
    return model.KIND_OF[type(record)]


def key_from_k8s(obj: dict, kind: str | None = None) -> str:
    """The model key (record.key) an object has, without converting it: deletions of
    objects that do not convert any more still find the record they replace."""
    kind = obj.get("kind") or kind
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    if kind in ("Pod", "NetworkPolicy"):
        return f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"
    if kind == "WorkloadEndpoint":
        return f"{spec.get('node', '')}/{spec.get('namespace', '')}/{spec.get('pod', '')}"
    if kind == "BlockAffinity":
        return spec.get("cidr") or "/".join(str(meta.get("name", "")).rsplit("-", 1))
    return str(meta.get("name", ""))


_TO: dict[type, Callable[..., dict]] = {
    Namespace: namespace_k8s, Pod: pod_k8s, Node: node_k8s, NetworkPolicy: network_policy_k8s,
    IPPool: ip_pool_k8s, BGPPeer: bgp_peer_k8s, WorkloadEndpoint: workload_endpoint_k8s,
    BlockAffinity: block_affinity_k8s,
}


def to_k8s(record: Record) -> dict:
    """The Kubernetes-shaped object for a record (the shape etcd stores)."""
    if isinstance(record, ClusterPolicy):
        return cluster_policy_k8s(record)
    fn = _TO.get(type(record))
    if fn is None:
        raise TypeError(f"not a model record: {record!r}")
    return fn(record)
