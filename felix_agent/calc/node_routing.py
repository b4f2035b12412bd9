"""The routing calc's per-node parts, kept up to date: a node add at 5,000 nodes redoes one
node's routes, VXLAN entries, BGP session and subnet check, not 5,000 of them.

    nr = NodeRouting(me, uplink=..., ...); nr.update(cluster); nr.remote_routes(), ...

Between passes it keeps (pure: it reads only the model it is given):
- node -> its blocks (affinities and pod CIDRs), updated from the affinities and nodes
  that changed (found by record identity: records are immutable);
- node -> NodePart: what that node contributes, for both IP families (routes.node_routes,
  vxlan_entry per family, derived_vtep of each family, bird_conf.node_session per family,
  far from my subnet, the modes of its far blocks' pools), redone when the node or its
  blocks change;
- the sums over the parts (routes, FDB and neighbour entries, far nodes, sessions).
Everything is redone from scratch when what every part depends on changes: my own node,
the pools, the set of route reflectors of either family, or a different Cluster.  A fresh NodeRouting's
first update() is the full calc (plan.routing_plan without one); the resync cross-checks
the kept one against it, and tests/unit/test_routing_incremental.py asserts they agree
after every event of random sequences.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from felix_agent.calc import routes as rc
from felix_agent.calc.bird_conf import Session, address_order, check_reflector, far_nodes, node_session, sessions, with_peer_sessions
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.desired import FDBEntry, Neighbor, Route
from felix_agent.model import DEFAULT_AS, BlockAffinity, IPPool, Node


@dataclass(frozen=True)
class NodePart:
    """What one remote node contributes to my routing."""

    routes: frozenset[Route]  # to its blocks of both families, except unicast routes into ipip pools
    ipip_routes: frozenset[Route]  # unicast routes into ipip pools (BIRD's when it runs)
    vxlan: tuple[tuple[FDBEntry, Neighbor] | None, ...]  # per family: (IPv4, IPv6)
    far: bool  # it has an IPv4 address that is not on my subnet (BIRD's next-hop routes)
    modes: frozenset[str]  # the modes of the pools of its blocks whose family's address is far
    session: tuple[Session | None, ...]  # per family: (IPv4, IPv6)
    session_error: tuple[str, ...]  # per family: its address cannot make a BGP session (why)


FAMILIES = (4, 6)


def _i(version: int) -> int:
    return 0 if version == 4 else 1


class NodeRouting:
    def __init__(self, me: str, *, uplink: str = rc.DEFAULT_UPLINK, node_ip: str = "", node_ip6: str = "",
                 derive_vteps: bool = False, default_as: int = DEFAULT_AS, mesh_password_file: str = ""):
        self.me, self.uplink, self.node_ip, self.node_ip6, self.derive_vteps = me, uplink, node_ip, node_ip6, derive_vteps
        self.default_as, self.mesh_password_file = default_as, mesh_password_file
        self._cluster: Cluster | None = None
        self.rebuilds = 0  # every part redone (first pass, another cluster, my node, pools, reflectors)
        self._node_version = -1  # the model's versions("Node") last followed (-1: none yet)
        self._block_version = -1
        self._blocks: dict[str, BlockAffinity] = {}  # the affinities counted in _aff
        self._aff: dict[str, Counter[str]] = {}  # node -> its affinities' canonical CIDRs
        self._context: tuple | None = None
        self._order: Mapping[str, Node] = {}  # the model's nodes, in its order (which node wins a tie)
        self._vteps: dict[str, Node] = {}  # derive_vteps: node -> its record with a VTEP
        self.nodes: Mapping[str, Node] = {}  # with my prefix and derived VTEPs
        self.by_node: dict[str, tuple[str, ...]] = {}
        self.mine: Node | None = None
        self.pools: tuple[IPPool, ...] = ()
        self._reflectors: tuple[set[str], set[str]] = (set(), set())  # per family
        self._parts: dict[str, NodePart] = {}
        # item -> how many parts give it; plain dicts, not Counters: frozenset() of an exact
        # dict reuses the stored hashes (10,000 routes: a dataclass hash each, ~10 ms a pass)
        self._routes: dict[Route, int] = {}
        self._ipip: dict[Route, int] = {}
        self._fdb: tuple[dict[FDBEntry, int], dict[FDBEntry, int]] = ({}, {})  # per family
        self._neigh: tuple[dict[Neighbor, int], dict[Neighbor, int]] = ({}, {})
        self._far: set[str] = set()
        self._off_subnet: set[str] = set()  # nodes with a part.modes (5,000 parts not read a pass)
        # per family: peer IP -> the nodes whose session it is; the nodes with a session_error
        self._sessions: tuple[dict[str, set[str]], dict[str, set[str]]] = ({}, {})
        self._errors: tuple[set[str], set[str]] = (set(), set())
        # the sorted far nodes and sessions, kept while no part changes them (5,000 to sort)
        self._far_sorted: list[Node] | None = None
        self._sess_sorted: list[tuple[tuple, list[Session]] | None] = [None, None]

    # --- feeding -------------------------------------------------------------------------

    def update(self, cluster: Cluster) -> None:
        """Bring the parts up to date with `cluster` (a different Cluster: from scratch)."""
        if cluster is not self._cluster:
            self.__init__(self.me, uplink=self.uplink, node_ip=self.node_ip,  # type: ignore[misc]
                          node_ip6=self.node_ip6,
                          derive_vteps=self.derive_vteps, default_as=self.default_as,
                          mesh_password_file=self.mesh_password_file)
            self._cluster = cluster
        dirty = self._changed_nodes(cluster) | self._changed_blocks(cluster)
        nodes = self._order = rc.with_own_prefix(cluster.nodes, self.me, self.node_ip, self.node_ip6)
        for name in dirty:
            for refl in self._reflectors:
                refl.discard(name)
            n = nodes.get(name)
            if n is None:
                self.by_node.pop(name, None)
                continue
            for version in FAMILIES:
                if n.address_of(version) and n.route_reflector_cluster_id:
                    self._reflectors[_i(version)].add(name)
            cidrs = {rc._canonical(c) for c in n.pod_cidrs} | set(self._aff.get(name, ()))
            self.by_node[name] = tuple(sorted(cidrs, key=rc._sort_key)) if len(cidrs) > 1 else tuple(cidrs)
        self.mine = nodes.get(self.me)
        self.pools = tuple(cluster.pools.values())
        context = (self.mine, self.pools, *(frozenset(r) for r in self._reflectors))
        if context != self._context:
            self._context = context
            self.rebuilds += 1
            self._clear_parts()
            dirty = set(nodes)
        if self.derive_vteps and any(p.mode == "vxlan" and not p.disabled for p in self.pools):
            # every node's record with its VTEP (a node's own or derived), kept like the parts
            for name in dirty:
                if name in nodes:
                    self._vteps[name] = rc.derived_vtep(nodes[name], self.by_node[name], self.pools)
                else:
                    self._vteps.pop(name, None)
            self.nodes = self._vteps
        else:
            self.nodes = nodes
        for name in dirty:
            self._set_part(name, self._part(self.nodes[name]) if name in nodes and name != self.me else None)

    def _changed_nodes(self, cluster: Cluster) -> set[str]:
        version = cluster.versions("Node")[0]
        if version == self._node_version:
            return set()
        since, self._node_version = self._node_version, version
        return set(cluster.changed_since("Node", since))

    def _changed_blocks(self, cluster: Cluster) -> set[str]:
        """The nodes whose affinities changed (their CIDRs counted again in _aff)."""
        version = cluster.versions("BlockAffinity")[0]
        if version == self._block_version:
            return set()
        since, self._block_version = self._block_version, version
        blocks, dirty = cluster.block_affinities, set()
        for k in cluster.changed_since("BlockAffinity", since):
            old, new = self._blocks.pop(k, None), blocks.get(k)
            if old is not None:
                counts = self._aff[old.node]
                cidr = rc._canonical(old.cidr)
                counts[cidr] -= 1
                if counts[cidr] <= 0:
                    del counts[cidr]
                dirty.add(old.node)
            if new is not None:
                self._blocks[k] = new
                self._aff.setdefault(new.node, Counter())[rc._canonical(new.cidr)] += 1
                dirty.add(new.node)
        return dirty

    def _part(self, n: Node) -> NodePart:
        mine = self.mine
        cidrs = self.by_node[n.name]
        routes = rc.node_routes(n, cidrs, mine, self.pools, self.uplink) if mine is not None else []
        ipip = frozenset(r for r in routes if r.type == "unicast" and
                         (p := rc.pool_for(r.dst, self.pools)) is not None and p.mode == "ipip")
        session: list[Session | None] = [None, None]
        error = ["", ""]
        for version in FAMILIES:
            if mine is not None and mine.address_of(version):
                try:
                    session[_i(version)] = node_session(
                        n, mine, frozenset(self._reflectors[_i(version)]), default_as=self.default_as,
                        mesh_password_file=self.mesh_password_file, version=version)
                except ValueError as e:
                    error[_i(version)] = str(e)
        far = mine is not None and bool(n.address) and not rc.same_subnet(mine, n)
        modes = rc.far_modes(n, cidrs, mine, self.pools) if mine is not None else frozenset()
        return NodePart(frozenset(routes) - ipip, ipip, (rc.vxlan_entry(n, 4), rc.vxlan_entry(n, 6)), far, modes,
                        tuple(session), tuple(error))

    def _set_part(self, name: str, part: NodePart | None) -> None:
        old = self._parts.pop(name, None)
        if (old is not None and old.far) or (part is not None and part.far):
            self._far_sorted = None
        for i in range(len(FAMILIES)):
            if old is None or part is None or old.session[i] != part.session[i]:
                self._sess_sorted[i] = None
        for p, sign in ((old, -1), (part, 1)):
            if p is None:
                continue
            _count(self._routes, p.routes, sign)
            _count(self._ipip, p.ipip_routes, sign)
            _member(self._far, name, p.far and sign > 0)
            _member(self._off_subnet, name, bool(p.modes) and sign > 0)
            for i in range(len(FAMILIES)):
                entry = p.vxlan[i]
                if entry is not None:
                    _count(self._fdb[i], (entry[0],), sign)
                    _count(self._neigh[i], (entry[1],), sign)
                _member(self._errors[i], name, bool(p.session_error[i]) and sign > 0)
                session = p.session[i]
                if session is not None:
                    owners = self._sessions[i].setdefault(session.peer_ip, set())
                    _member(owners, name, sign > 0)
                    if not owners:
                        del self._sessions[i][session.peer_ip]
        if part is not None:
            self._parts[name] = part

    def _clear_parts(self) -> None:
        self._far_sorted, self._sess_sorted = None, [None, None]
        self._parts.clear()
        for c in (self._routes, self._ipip, *self._fdb, *self._neigh, *self._sessions, *self._errors):
            c.clear()
        self._far.clear()
        self._off_subnet.clear()
        self._vteps.clear()

    # --- reading (after update) ----------------------------------------------------------

    def remote_routes(self) -> frozenset[Route]:
        """routes.remote_routes of the model: every remote node's blocks."""
        return frozenset(self._routes) | frozenset(self._ipip)

    def ipip_routes(self) -> frozenset[Route]:
        """The unicast routes of remote_routes() into ipip pools."""
        return frozenset(self._ipip)

    def vxlan_peers(self, version: int = 4) -> tuple[frozenset[FDBEntry], frozenset[Neighbor]]:
        """routes.vxlan_peers of the model for IP version `version` (with the derived VTEPs)."""
        if not any(p.mode == "vxlan" and not p.disabled and rc.version_of(p.cidr) == version for p in self.pools):
            return frozenset(), frozenset()
        return frozenset(self._fdb[_i(version)]), frozenset(self._neigh[_i(version)])

    def off_subnet_nodes(self, mode: str) -> tuple[str, ...]:
        """routes.off_subnet_nodes of the model."""
        return tuple(sorted(name for name in self._off_subnet if mode in self._parts[name].modes))

    def far_nodes(self) -> list[Node]:
        """bird_conf.far_nodes of the model."""
        if self._far_sorted is None:
            self._far_sorted = sorted((self.nodes[name] for name in self._far), key=address_order)
        return self._far_sorted

    def sessions(self, peers, version: int = 4) -> list[Session]:
        """bird_conf.sessions of the model for IP version `version` (ValueError as it raises)."""
        i = _i(version)
        mine = self.mine
        if mine is None or not mine.address_of(version):
            raise ValueError(f"node {self.me!r} is unknown or has no IPv{version} address; cannot render BGP")
        check_reflector(mine, frozenset(self._reflectors[i]))
        errors, by_peer = self._errors[i], self._sessions[i]
        order: dict[str, int] = {}
        if errors or any(len(owners) > 1 for owners in by_peer.values()):
            order = {name: k for k, name in enumerate(self._order)}  # the model's order decides
        if errors:
            raise ValueError(self._parts[min(errors, key=order.__getitem__)].session_error[i])
        key = tuple(peers.values()) if isinstance(peers, Mapping) else tuple(peers)
        kept = self._sess_sorted[i]
        if kept is None or kept[0] != key or order:  # a tie: the model's order
            by_ip = {}
            for ip, owners in by_peer.items():
                name = next(iter(owners)) if len(owners) == 1 else max(owners, key=order.__getitem__)
                by_ip[ip] = self._parts[name].session[i]
            kept = self._sess_sorted[i] = (key, with_peer_sessions(by_ip, peers, mine,  # type: ignore[arg-type]
                                                                   default_as=self.default_as, version=version))
        return kept[1]


class FullRouting:
    """NodeRouting's answers from the whole-cluster functions of routes.py and bird_conf.py,
    from scratch on every update: the reference the resync cross-checks against."""

    def __init__(self, me: str, *, uplink: str = rc.DEFAULT_UPLINK, node_ip: str = "", node_ip6: str = "",
                 derive_vteps: bool = False, default_as: int = DEFAULT_AS, mesh_password_file: str = ""):
        self.me, self.uplink, self.node_ip, self.node_ip6, self.derive_vteps = me, uplink, node_ip, node_ip6, derive_vteps
        self.default_as, self.mesh_password_file = default_as, mesh_password_file

    def update(self, cluster: Cluster) -> None:
        self.pools, self.blocks = cluster.pools, cluster.block_affinities
        nodes = rc.with_own_prefix(cluster.nodes, self.me, self.node_ip, self.node_ip6)
        self.by_node = rc.blocks_by_node(nodes, self.blocks)
        if self.derive_vteps and any(p.mode == "vxlan" and not p.disabled for p in self.pools.values()):
            nodes = {n.name: n for n in rc.with_derived_vteps(nodes, self.pools, self.blocks, self.by_node)}
        self.nodes = nodes

    def remote_routes(self) -> frozenset[Route]:
        return rc.remote_routes(self.nodes, self.pools, self.blocks, self.me, uplink=self.uplink, by_node=self.by_node)

    def ipip_routes(self) -> frozenset[Route]:
        return frozenset(r for r in self.remote_routes() if r.type == "unicast" and
                         (p := rc.pool_for(r.dst, self.pools)) is not None and p.mode == "ipip")

    def vxlan_peers(self, version: int = 4) -> tuple[frozenset[FDBEntry], frozenset[Neighbor]]:
        return rc.vxlan_peers(self.nodes, self.pools, self.me, version)

    def off_subnet_nodes(self, mode: str) -> tuple[str, ...]:
        return rc.off_subnet_nodes(self.nodes, self.pools, self.blocks, self.me, mode, self.by_node)

    def far_nodes(self) -> list[Node]:
        return far_nodes(self.nodes.values(), self.nodes[self.me])

    def sessions(self, peers, version: int = 4) -> list[Session]:
        return sessions(self.nodes, peers, self.me, default_as=self.default_as,
                        mesh_password_file=self.mesh_password_file, version=version)


def _count(counts: dict, items, sign: int) -> None:
    for x in items:
        n = counts.get(x, 0) + sign
        if n > 0:
            counts[x] = n
        else:
            counts.pop(x, None)


def _member(s: set[str], name: str, present: bool) -> None:
    if present:
        s.add(name)
    else:
        s.discard(name)
