"""The policy calc kept up to date: what dataplane_state (filter.py) computes, with the
work of a pass proportional to what changed, not to the cluster.

    calc = IncrementalCalc(config); calc.state(cluster, errors) -> DesiredState

Kept between passes (still pure: it reads only the model it is given):
- every endpoint's labels, indexed by namespace and by label (key, value);
- for each pod selector some set of a local policy uses, the endpoints it selects and the
  set's members; an endpoint that changed is checked against each selector (a label change
  moves it between sets), and only sets whose members changed are rebuilt (named-port
  members are counted endpoint by endpoint, so even those are not rescanned);
- a new selector (a new or changed policy) is evaluated once, from the smallest label
  posting list of its matchLabels (or its namespace's endpoints), not from every pod;
- namespace labels: a Namespace change re-evaluates the selectors with namespaceSelectors;
- policies by namespace: only the policies of namespaces with local endpoints can select
  one (a policy's podSelector is namespaced), so a pass looks at those alone;
- pool/host sets while pools and nodes stand.
The from-scratch dataplane_state stays the reference: the resync cross-checks against it and
tests/unit/test_calc_incremental.py asserts equality after every event of random sequences.
"""
from __future__ import annotations

from collections import Counter

from felix_agent.calc.cluster import Cluster, PodId
from felix_agent.calc.desired import DesiredState, IpSet
from felix_agent.calc.filter import CalcConfig, render_state
from felix_agent.calc.ipsets import SetSpec, desired_ipset
from felix_agent.calc.nat import ALL_HOSTS_SET, node_hosts, pool_sets
from felix_agent.calc.selectors import PeerSelector, addresses, namespace_labels, port_members
from felix_agent.model import Endpoint, NetworkPolicy, Node


class _Selection:
    __slots__ = ("pids", "members", "endpoints", "named", "named_sets")

    def __init__(self, pids: set[PodId]):
        self.pids = pids
        self.members: dict[int, frozenset[str]] = {}  # family -> members, until a member changes
        self.endpoints: tuple[Endpoint, ...] | None = None
        # (port name, protocol, family) -> member -> how many selected endpoints give it,
        # kept up to date endpoint by endpoint: rebuilding a named-port set over every
        # selected pod on each change cost ~40 ms at 100k pods.
        self.named: dict[tuple[str, str, int], Counter[str]] = {}
        self.named_sets: dict[tuple[str, str, int], frozenset[str]] = {}  # cached until a count changes

    def follow(self, old: Endpoint | None, new: Endpoint | None) -> None:
        """One selected endpoint left (old), arrived (new) or changed (both)."""
        self.members = {}
        self.endpoints = None
        self.named_sets.clear()
        for (name, proto, family), counts in self.named.items():
            if old is not None:
                for m in port_members(old, name, proto, family):
                    counts[m] -= 1
                    if counts[m] <= 0:
                        del counts[m]
            if new is not None:
                counts.update(port_members(new, name, proto, family))


class IncrementalCalc:
    def __init__(self, config: CalcConfig):
        self.config = config
        self._cluster: Cluster | None = None
        self.rebuilds = 0  # full index builds (first pass, or a different cluster)

    # --- indexes -------------------------------------------------------------------------

    def _reset(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.rebuilds += 1
        self._eps: dict[PodId, Endpoint] = {}
        self._labels: dict[PodId, dict[str, str]] = {}
        self._by_ns: dict[str, set[PodId]] = {}
        self._by_label: dict[tuple[str, str], set[PodId]] = {}
        self._sel: dict[PeerSelector, _Selection] = {}
        self._ipsets: dict[SetSpec, IpSet] = {}
        self._ns_version: tuple[int, ...] | None = None
        self._ns_labels: dict[str, dict[str, str]] = {}
        self._ns_match: dict[tuple[PeerSelector, str], bool] = {}
        self._pol_version: tuple[int, ...] | None = None
        self._pol_by_ns: dict[str, list[NetworkPolicy]] = {}
        self._pol_sorted: tuple[frozenset[str], list[NetworkPolicy]] = (frozenset(), [])
        self._pool_version: tuple[int, ...] | None = None
        self._pool_sets: tuple[dict[str, IpSet], list[str]] = ({}, [])
        self._host_nodes: dict[str, Node] = {}  # the nodes the host set was last counted from
        self._host_version = -1  # the model's versions("Node") then
        self._hosts: Counter[str] = Counter()  # host set member -> how many nodes give it
        cluster.take_endpoint_changes()
        for pid, ep in cluster.endpoint_map().items():
            self._index(pid, ep)

    def _index(self, pid: PodId, ep: Endpoint) -> None:
        labels = dict(ep.labels)
        self._eps[pid] = ep
        self._labels[pid] = labels
        self._by_ns.setdefault(ep.namespace, set()).add(pid)
        for kv in ep.labels:
            self._by_label.setdefault(kv, set()).add(pid)
        if ep.namespace not in self._ns_labels:
            # Namespaces named by pods count before their Namespace record arrives.
            self._ns_labels[ep.namespace] = namespace_labels(ep.namespace, None)

    def _unindex(self, pid: PodId) -> None:
        ep = self._eps.pop(pid)
        del self._labels[pid]
        self._discard(self._by_ns, ep.namespace, pid)
        for kv in ep.labels:
            self._discard(self._by_label, kv, pid)

    @staticmethod
    def _discard(index: dict, key, pid: PodId) -> None:
        s = index[key]
        s.discard(pid)
        if not s:
            del index[key]

    def _endpoint_changed(self, pid: PodId, ep: Endpoint | None) -> None:
        old = self._eps.get(pid)
        if old is not None:
            self._unindex(pid)
        if ep is not None:
            self._index(pid, ep)
        changed = set()
        for sel, selection in self._sel.items():
            was = pid in selection.pids
            now = ep is not None and self._matches(sel, pid, ep)
            if now:
                selection.pids.add(pid)
            elif was:
                selection.pids.discard(pid)
            else:
                continue
            selection.follow(old if was else None, ep if now else None)
            changed.add(sel)
        if changed:
            self._ipsets = {spec: s for spec, s in self._ipsets.items()
                            if getattr(spec, "sel", None) not in changed}

    def _ns_ok(self, sel: PeerSelector, ns: str) -> bool:
        if sel.namespaces is None:
            return ns == sel.namespace
        hit = self._ns_match.get((sel, ns))
        if hit is None:
            labels = self._ns_labels.get(ns) or namespace_labels(ns, None)
            hit = self._ns_match[(sel, ns)] = sel.namespaces.matches(labels)
        return hit

    def _matches(self, sel: PeerSelector, pid: PodId, ep: Endpoint) -> bool:
        return self._ns_ok(sel, ep.namespace) and (sel.pods.is_empty or sel.pods.matches(self._labels[pid]))

    def _scan(self, sel: PeerSelector) -> set[PodId]:
        if sel.pods.match_labels:
            cands = min((self._by_label.get(kv, set()) for kv in sel.pods.match_labels), key=len)
        elif sel.namespaces is None:
            cands = self._by_ns.get(sel.namespace, set())
        else:
            cands = [pid for ns, pids in self._by_ns.items() if self._ns_ok(sel, ns) for pid in pids]
        eps = self._eps
        return {pid for pid in cands if self._matches(sel, pid, eps[pid])}

    def _selection(self, sel: PeerSelector) -> _Selection:
        hit = self._sel.get(sel)
        if hit is None:
            hit = self._sel[sel] = _Selection(self._scan(sel))
        return hit

    def _refresh_namespaces(self, cluster: Cluster) -> None:
        version = cluster.versions("Namespace")
        if version == self._ns_version:
            return
        self._ns_version = version
        records = cluster.namespaces
        self._ns_labels = {name: namespace_labels(name, records.get(name))
                           for name in set(records) | set(self._by_ns)}
        self._ns_match.clear()
        for sel in [s for s in self._sel if s.namespaces is not None]:
            del self._sel[sel]  # evaluated again when next used
        self._ipsets = {spec: s for spec, s in self._ipsets.items()
                        if getattr(getattr(spec, "sel", None), "namespaces", None) is None}

    def _policies_for(self, cluster: Cluster, namespaces: set[str]) -> list[NetworkPolicy]:
        version = cluster.versions("NetworkPolicy")
        if version != self._pol_version:
            self._pol_version = version
            self._pol_by_ns = {}
            self._pol_sorted = (frozenset(), [])
            for p in cluster.policies.values():
                self._pol_by_ns.setdefault(p.namespace, []).append(p)
        if self._pol_sorted[0] != namespaces:
            out = [p for ns in namespaces for p in self._pol_by_ns.get(ns, ())]
            out.sort(key=lambda p: p.key)
            self._pol_sorted = (frozenset(namespaces), out)
        return self._pol_sorted[1]

    # --- what render_state asks for ------------------------------------------------------

    def select(self, sel: PeerSelector) -> tuple[Endpoint, ...]:
        """SelectorIndex's interface, for the set member functions of calc/ipsets.py."""
        s = self._selection(sel)
        if s.endpoints is None:
            s.endpoints = tuple(self._eps[pid] for pid in s.pids)
        return s.endpoints

    def members(self, sel: PeerSelector, family: int = 4) -> frozenset[str]:
        s = self._selection(sel)
        hit = s.members.get(family)
        if hit is None:
            eps = self._eps
            hit = s.members[family] = frozenset(ip for pid in s.pids for ip in addresses(eps[pid].ips, family))
        return hit

    def named_members(self, sel: PeerSelector, port_name: str, protocol: str, family: int = 4) -> frozenset[str]:
        s = self._selection(sel)
        key = (port_name, protocol, family)
        hit = s.named_sets.get(key)
        if hit is None:
            counts = s.named.get(key)
            if counts is None:
                eps = self._eps
                counts = s.named[key] = Counter(
                    m for pid in s.pids for m in port_members(eps[pid], port_name, protocol, family))
            hit = s.named_sets[key] = frozenset(counts)
        return hit

    def _ipset(self, spec: SetSpec) -> IpSet:
        hit = self._ipsets.get(spec)
        if hit is None:
            hit = self._ipsets[spec] = desired_ipset(spec, self)  # type: ignore[arg-type]
        return hit

    def _pool_ipsets(self, cluster: Cluster, errs: list[str]) -> dict[str, IpSet]:
        version = cluster.versions("IPPool", "Node")
        if version != self._pool_version:
            self._pool_version = version
            perrs: list[str] = []
            sets = pool_sets(cluster.pools.values(), (), perrs)
            sets[ALL_HOSTS_SET] = IpSet(ALL_HOSTS_SET, self._count_hosts(cluster))
            self._pool_sets = (sets, perrs)
        errs.extend(self._pool_sets[1])
        return self._pool_sets[0]

    def _count_hosts(self, cluster: Cluster) -> frozenset[str]:
        """The all-hosts set, counted node by node: only the nodes that changed are
        looked at again (a node add at 5,000 nodes re-read 5,000 addresses)."""
        since, self._host_version = self._host_version, cluster.versions("Node")[0]
        now, hosts = cluster.nodes, self._hosts
        for name in cluster.changed_since("Node", since):
            old = self._host_nodes.pop(name, None)
            if old is not None:
                hosts.subtract(node_hosts(old))
            if name in now:
                self._host_nodes[name] = now[name]
                hosts.update(node_hosts(now[name]))
        self._hosts = +hosts  # drops the members no node gives any more
        return frozenset(self._hosts)

    # --- a pass --------------------------------------------------------------------------

    def state(self, cluster: Cluster, errors: list[str] | None = None) -> DesiredState:
        errs: list[str] = errors if errors is not None else []
        if cluster is not self._cluster:
            self._reset(cluster)
        else:
            eps = cluster.endpoint_map()
            for pid in cluster.take_endpoint_changes():
                self._endpoint_changed(pid, eps.get(pid))
        self._refresh_namespaces(cluster)
        errs.extend(cluster.problems())
        here = cluster.endpoints_on(self.config.node_name)
        policies = self._policies_for(cluster, {ep.namespace for ep in here})
        used: set[PeerSelector] = set()

        def ipset_for(spec: SetSpec) -> IpSet:
            sel = getattr(spec, "sel", None)
            if sel is not None:
                used.add(sel)
            return self._ipset(spec)
        state = render_state(cluster, self.config, errs, here, policies, cluster.cluster_policies(), ipset_for,
                             lambda: self._pool_ipsets(cluster, errs))
        # Selectors no set uses any more are dropped, so events stop paying for them.
        for sel in [s for s in self._sel if s not in used]:
            del self._sel[sel]
        self._ipsets = {spec: s for spec, s in self._ipsets.items()
                        if getattr(spec, "sel", None) is None or spec.sel in used}
        return state
