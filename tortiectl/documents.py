"""The kinds tortiectl knows (and every spelling kubectl users type for them), and the
manifests it reads: multi-document Kubernetes YAML, each document validated with
convert.from_k8s before anything is written."""
from __future__ import annotations

import sys
from typing import Any, Iterable

import yaml

from felix_agent import model
from felix_agent.datastore.convert import ConvertError, from_k8s
from tortiectl.errors import CliError

APPLICABLE = ("Pod", "Namespace", "Node", "NetworkPolicy", "IPPool", "BGPPeer", *model.CLUSTER_POLICY_KINDS)

# Every spelling kubectl users type, to the kind.
ALIASES = {}
for _kind, _names in {
    "Pod": ("pod", "pods", "po"),
    "Namespace": ("namespace", "namespaces", "ns"),
    "Node": ("node", "nodes", "no"),
    "NetworkPolicy": ("networkpolicy", "networkpolicies", "netpol"),
    "ClusterNetworkPolicy": ("clusternetworkpolicy", "clusternetworkpolicies", "cnp"),
    "AdminNetworkPolicy": ("adminnetworkpolicy", "adminnetworkpolicies", "anp"),
    "BaselineAdminNetworkPolicy": ("baselineadminnetworkpolicy", "baselineadminnetworkpolicies", "banp"),
    "IPPool": ("ippool", "ippools", "pool", "pools"),
    "BGPPeer": ("bgppeer", "bgppeers", "peer", "peers"),
    "WorkloadEndpoint": ("workloadendpoint", "workloadendpoints", "wep", "weps"),
    "BlockAffinity": ("blockaffinity", "blockaffinities", "block", "blocks"),
}.items():
    for _n in _names:
        ALIASES[_n] = _kind


def resolve_kind(text: str) -> str:
    kind = ALIASES.get(text.lower())
    if kind is None:
        raise CliError(f"unknown resource type {text!r} (one of: {', '.join(sorted(set(ALIASES.values())))})")
    return kind


# --- reading manifests ------------------------------------------------------------------

def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "not a mapping"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name", "<unnamed>")
    ns = meta.get("namespace")
    return f"{obj.get('kind', '<no kind>')} {ns + '/' if ns else ''}{name}"


def read_documents(path: str) -> list[tuple[str, dict]]:
    """(label, object) for every non-empty document; kind: List is flattened. The label
    ("FILE document N (Kind ns/name)") is what errors name."""
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    src = "stdin" if path == "-" else path
    out = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise CliError(f"{src}: invalid YAML: {e}") from None
    for i, doc in enumerate(docs, 1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise CliError(f"{src} document {i}: not a Kubernetes object (got {type(doc).__name__})")
        items = doc.get("items") if doc.get("kind") == "List" else [doc]
        for j, obj in enumerate(items or [], 1):
            label = f"{src} document {i}" + (f" item {j}" if doc.get("kind") == "List" else "")
            out.append((f"{label} ({_describe(obj)})", obj))
    if not out:
        raise CliError(f"{src}: no objects found")
    return out


def validate_documents(docs: list[tuple[str, dict]], kinds: Iterable[str] = APPLICABLE) -> list[model.Record]:
    records = []
    allowed = tuple(kinds)
    for label, obj in docs:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in allowed:
            raise CliError(f"{label}: kind {kind!r} cannot be applied (one of: {', '.join(allowed)})")
        try:
            records.append(from_k8s(obj))
        except ConvertError as e:
            raise CliError(f"{label}: {e}") from None
    seen: dict[tuple[str, str], str] = {}
    for (label, _), rec in zip(docs, records):
        rid = (model.KIND_OF[type(rec)], rec.key)
        if rid in seen:
            raise CliError(f"{label}: the same object as {seen[rid]}")
        seen[rid] = label
    return records
