"""Cluster: the in-memory index of the model, fed by the Syncer's Update events.

It holds every record by kind and key and derives the Endpoint join (Pod x
WorkloadEndpoint) that the policy calculation works on.  The join is kept incrementally:
an update marks the one (namespace, pod) it touches dirty and only dirty joins are
recomputed, so a busy cluster costs O(changes), not O(pods), per batch.
"""
from __future__ import annotations

import json
from types import MappingProxyType
from typing import Mapping

from felix_agent.model import (
    CLUSTER_POLICY_KINDS,
    KIND_OF,
    KINDS,
    TIERS,
    ClusterPolicy,
    BGPPeer,
    BlockAffinity,
    Endpoint,
    Event,
    IPPool,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    Record,
    Update,
    WorkloadEndpoint,
)

FLOATING_IPS_ANNOTATION = "tortie.io/floatingIPs"

PodId = tuple[str, str]  # (namespace, pod name)
# Kinds whose changed keys the cluster logs (changed_since): the routing calc follows 5,000
# nodes and 10,000 blocks key by key instead of comparing the tables every pass.
KEY_LOGGED = ("Node", "BlockAffinity")


def parse_floating_ips(pod: Pod) -> tuple[tuple[str, ...], str]:
    """The pod's floating IPs from its annotation (a JSON list of strings) and a problem
    text ("" when fine).  A malformed annotation gives no floating IPs rather than a guess."""
    raw = dict(pod.annotations).get(FLOATING_IPS_ANNOTATION)
    if raw is None:
        return (), ""
    try:
        value = json.loads(raw)
    except ValueError as e:
        return (), f"pod {pod.key}: annotation {FLOATING_IPS_ANNOTATION} is not JSON: {e}"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return (), f"pod {pod.key}: annotation {FLOATING_IPS_ANNOTATION} must be a JSON list of strings"
    return tuple(value), ""


class Cluster:
    """Every model record by kind, plus the derived endpoints.

    Update.key must be the record's own `.key` (so deletes find what sets stored)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Record]] = {kind: {} for kind in KINDS}
        # join indexes: (namespace, pod) -> Pod / -> {wep key: WEP}
        self._pod_by_id: dict[PodId, Pod] = {}
        self._weps_by_id: dict[PodId, dict[str, WorkloadEndpoint]] = {}
        self._endpoints: dict[PodId, Endpoint] = {}
        self._problems: dict[PodId, str] = {}
        self._dirty: set[PodId] = set()
        self._sorted: tuple[Endpoint, ...] | None = ()
        # kind -> how many changes it has had: a calc whose inputs are a few kinds (routes:
        # nodes, pools, blocks) keeps its last result while their versions stand.
        self._versions: dict[str, int] = dict.fromkeys(KINDS, 0)
        # kind -> key -> the kind's version when the key last changed, in that order
        self._key_versions: dict[str, dict[str, int]] = {kind: {} for kind in KEY_LOGGED}
        # For the incremental calc: endpoints by node, and which endpoints changed since it
        # last asked (take_endpoint_changes), so a pass touches only those.
        self._by_node: dict[str, set[PodId]] = {}
        self._ep_changes: set[PodId] = set()
        self._cp_sorted: tuple[tuple[int, ...], tuple[ClusterPolicy, ...]] = ((), ())

    # --- feeding -------------------------------------------------------------------------

    def apply(self, event: Event) -> set[str]:
        """Apply one event; returns the kinds that really changed (empty for a no-op,
        e.g. an unchanged record, a delete of an unknown key, or a SyncStatus)."""
        if not isinstance(event, Update):
            return set()
        kind, key, value = event.kind, event.key, event.value
        if kind not in self._records:
            raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        if value is not None:
            if KIND_OF.get(type(value)) != kind:
                raise ValueError(f"update of kind {kind} carries a {type(value).__name__}")
            if value.key != key:
                raise ValueError(f"update key {key!r} differs from the record's key {value.key!r}")
        table = self._records[kind]
        old = table.get(key)
        if old == value:
            return set()
        if value is None:
            del table[key]
        else:
            table[key] = value
        self._versions[kind] += 1
        logged = self._key_versions.get(kind)
        if logged is not None:
            logged.pop(key, None)  # re-inserted last: the dict stays in version order
            logged[key] = self._versions[kind]
        if kind in ("Pod", "WorkloadEndpoint"):
            self._index_join(old, value)
        return {kind}

    def apply_all(self, events) -> set[str]:
        changed: set[str] = set()
        for e in events:
            changed |= self.apply(e)
        return changed

    def _index_join(self, old: Record | None, new: Record | None) -> None:
        for rec, present in ((old, False), (new, True)):
            if rec is None:
                continue
            if isinstance(rec, Pod):
                pid = (rec.namespace, rec.name)
                if present:
                    self._pod_by_id[pid] = rec
                elif self._pod_by_id.get(pid) == rec:
                    del self._pod_by_id[pid]
            else:
                assert isinstance(rec, WorkloadEndpoint)
                pid = (rec.namespace, rec.pod)
                weps = self._weps_by_id.setdefault(pid, {})
                if present:
                    weps[rec.key] = rec
                else:
                    weps.pop(rec.key, None)
                    if not weps:
                        del self._weps_by_id[pid]
            self._dirty.add(pid)
            self._sorted = None

    def snapshot(self) -> "Cluster":
        """A copy that later events do not change (records are immutable, so only the
        tables are copied): the resync's from-scratch calc reads it on another thread."""
        self._refresh()
        c = Cluster.__new__(Cluster)
        c.__dict__.update(self.__dict__)
        c._records = {kind: dict(table) for kind, table in self._records.items()}
        c._pod_by_id = dict(self._pod_by_id)
        c._weps_by_id = {pid: dict(w) for pid, w in self._weps_by_id.items()}
        c._endpoints = dict(self._endpoints)
        c._problems = dict(self._problems)
        c._dirty = set()
        c._versions = dict(self._versions)
        c._key_versions = {kind: dict(log) for kind, log in self._key_versions.items()}
        c._by_node = {node: set(pids) for node, pids in self._by_node.items()}
        c._ep_changes = set()
        return c

    # --- reading -------------------------------------------------------------------------

    def versions(self, *kinds: str) -> tuple[int, ...]:
        """How many changes each of `kinds` has had (equal tuples: nothing of them changed)."""
        return tuple(self._versions[k] for k in kinds)

    def changed_since(self, kind: str, version: int) -> list[str]:
        """The keys of `kind` (one of KEY_LOGGED) added, changed or removed since the kind's
        version was `version` (versions(kind)[0]); a negative `version` (a calc's first
        pass, nothing kept yet): every key the kind has now."""
        if version < 0:
            return list(self._records[kind])
        out = []
        for key, v in reversed(self._key_versions[kind].items()):
            if v <= version:
                break
            out.append(key)
        return out

    def _table(self, kind: str) -> Mapping:
        return MappingProxyType(self._records[kind])

    @property
    def namespaces(self) -> Mapping[str, Namespace]:
        return self._table("Namespace")

    @property
    def pods(self) -> Mapping[str, Pod]:
        return self._table("Pod")

    @property
    def workload_endpoints(self) -> Mapping[str, WorkloadEndpoint]:
        return self._table("WorkloadEndpoint")

    @property
    def nodes(self) -> Mapping[str, Node]:
        return self._table("Node")

    @property
    def pools(self) -> Mapping[str, IPPool]:
        return self._table("IPPool")

    @property
    def bgp_peers(self) -> Mapping[str, BGPPeer]:
        return self._table("BGPPeer")

    @property
    def block_affinities(self) -> Mapping[str, BlockAffinity]:
        return self._table("BlockAffinity")

    @property
    def policies(self) -> Mapping[str, NetworkPolicy]:
        return self._table("NetworkPolicy")

    def cluster_policies(self) -> tuple[ClusterPolicy, ...]:
        """Every ClusterNetworkPolicy, AdminNetworkPolicy and BaselineAdminNetworkPolicy in
        evaluation order: the Admin tier, then the Baseline tier, each by precedence."""
        version = self.versions(*CLUSTER_POLICY_KINDS)
        if self._cp_sorted[0] != version:
            every = [p for kind in CLUSTER_POLICY_KINDS for p in self._records[kind].values()]
            every.sort(key=lambda p: (TIERS.index(p.tier), p.precedence))
            self._cp_sorted = (version, tuple(every))
        return self._cp_sorted[1]

    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every endpoint of the cluster (all nodes), sorted by key."""
        self._refresh()
        if self._sorted is None:
            self._sorted = tuple(self._endpoints[k] for k in sorted(self._endpoints))
        return self._sorted

    def endpoint_map(self) -> Mapping[PodId, Endpoint]:
        """(namespace, pod) -> Endpoint, every node's."""
        self._refresh()
        return MappingProxyType(self._endpoints)

    def endpoints_on(self, node: str) -> tuple[Endpoint, ...]:
        """The endpoints of one node, sorted by key (a pass needs only this node's)."""
        self._refresh()
        eps = self._endpoints
        return tuple(eps[pid] for pid in sorted(self._by_node.get(node, ())))

    def take_endpoint_changes(self) -> set[PodId]:
        """The endpoints added, changed or removed since the last call (for one consumer:
        the incremental calc, which rebuilds from endpoint_map() when it starts)."""
        self._refresh()
        out, self._ep_changes = self._ep_changes, set()
        return out

    def problems(self) -> list[str]:
        """Data problems found while joining (e.g. a malformed floating-IP annotation)."""
        self._refresh()
        return [self._problems[k] for k in sorted(self._problems)]

    def _refresh(self) -> None:
        for pid in self._dirty:
            ep, problem = self._join(pid)
            old = self._endpoints.get(pid)
            if old != ep:
                self._ep_changes.add(pid)
                if old is not None:
                    on_node = self._by_node[old.node]
                    on_node.discard(pid)
                    if not on_node:
                        del self._by_node[old.node]
                if ep is not None:
                    self._by_node.setdefault(ep.node, set()).add(pid)
            if ep is None:
                self._endpoints.pop(pid, None)
            else:
                self._endpoints[pid] = ep
            if problem:
                self._problems[pid] = problem
            else:
                self._problems.pop(pid, None)
        self._dirty.clear()

    def _join(self, pid: PodId) -> tuple[Endpoint | None, str]:
        pod = self._pod_by_id.get(pid)
        if pod is not None and pod.host_network:
            return None, ""  # policy does not apply to host-network pods
        wep = self._pick_wep(pid, pod)
        if wep is None and (pod is None or pod.finished):
            # A finished pod that no sandbox wires any more has no network: no endpoint,
            # so no chains are kept for it while the Pod object lingers (Jobs keep theirs).
            return None, ""
        floating, problem = parse_floating_ips(pod) if pod is not None else ((), "")
        ep = Endpoint(
            namespace=pid[0],
            pod=pid[1],
            node=wep.node if wep is not None else pod.node,
            ips=wep.ips if wep is not None and wep.ips else (pod.ips if pod is not None else ()),
            labels=pod.labels if pod is not None else (),
            iface=wep.iface if wep is not None else "",
            ports=pod.ports if pod is not None else (),
            floating_ips=floating,
        )
        return ep, problem

    def _pick_wep(self, pid: PodId, pod: Pod | None) -> WorkloadEndpoint | None:
        weps = self._weps_by_id.get(pid)
        if not weps:
            return None
        # A stale WEP can outlive a pod that moved: prefer the one on the pod's node,
        # otherwise the last by key so the choice is deterministic.
        if pod is not None:
            on_node = [w for k, w in sorted(weps.items()) if w.node == pod.node]
            if on_node:
                return on_node[-1]
        return weps[max(weps)]
