"""Routes between nodes (pure): which kernel routes, VXLAN FDB and neighbour entries a
node needs for every other node's pod blocks, by the routing mode of the block's pool.

A node's blocks are its BlockAffinity CIDRs (etcd mode) plus Node.pod_cidrs (kubernetes
mode).  A block belongs to the enabled pool that contains it; blocks outside every
enabled pool get no route at all (a disabled pool is not routed, as in the BIRD filters
of felix_agent.calc.bird_conf, so the two halves never disagree).

Per mode, for a block of a REMOTE node:
  direct  `<block> via <nodeIP> dev <uplink> onlink` - only for nodes on my subnet: across
          a router the gateway would not be on the link and the router knows no pod
          blocks, so no route is made (see unreachable_direct_nodes(), the agent logs it).
  vxlan   `<block> via <remote VTEP> dev vxlan.calico onlink` (needs the remote node's
          published VTEP address and MAC; a node that has not published them yet gets
          no route until it does).
          crossSubnet: `<block> via <nodeIP> dev <uplink>` on my subnet, VXLAN across.
  ipip    `<block> via <nodeIP> dev tunl0 onlink`; crossSubnet: plain next hop on my subnet.
  bgp     nothing: BIRD learns and programs these (felix_agent.calc.bird_conf).
Both families alike: a block's IP version picks the peer's address of that version
(Node.ip / Node.ip6) as next hop and underlay, its subnet for "near", and the vxlan
device of that version (vxlan.calico, or vxlan-v6.calico with its own VTEP, carried over
the IPv6 underlay, as Calico does).  ipip is IPv4-only (no IPv6 pool takes it).
For MY OWN blocks in non-bgp pools, local_block_routes() gives blackhole routes, so
traffic to an unused address of my block is dropped here instead of bouncing out of the
default route (the /32 routes of local pods are more specific and win).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import TypeVar

from felix_agent.calc.desired import FDBEntry, Neighbor, Route
from felix_agent.model import BlockAffinity, IPPool, Node

VXLAN_DEVICE = "vxlan.calico"
VXLAN_DEVICE_V6 = "vxlan-v6.calico"
VXLAN_DEVICES = {4: VXLAN_DEVICE, 6: VXLAN_DEVICE_V6}
IPIP_DEVICE = "tunl0"
DEFAULT_UPLINK = "eth0"

T = TypeVar("T")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
# Every function takes the model as collections of records or as key -> record maps.
Nodes = Iterable[Node] | Mapping[str, Node]
Pools = Iterable[IPPool] | Mapping[str, IPPool]
Blocks = Iterable[BlockAffinity] | Mapping[str, BlockAffinity]


def records(x: Iterable[T] | Mapping[object, T]) -> list[T]:
    """Accept either a collection of records or a key -> record mapping (what the
    agent's model holds), so callers need not convert."""
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def ip_address(addr: str, what: str, version: int = 4) -> str:
    """The plain address of IP version `version` of `addr` (a prefix is dropped), or
    ValueError naming `what` - the one validator the BGP config and the tunnel driver share."""
    try:
        ip = _ip(addr.split("/")[0])
    except ValueError:
        raise ValueError(f"{what}: {addr!r} is not an IP address") from None
    if ip.version != version:
        raise ValueError(f"{what}: {addr!r} is not IPv{version}")
    return str(ip)


def ipv4_address(addr: str, what: str) -> str:
    return ip_address(addr, what, 4)


def version_of(cidr: str) -> int:
    """4 or 6: the IP version of a CIDR."""
    return _net(cidr).version


# Node addresses and subnets are asked for every node several times a pass (BGP sessions,
# same-subnet checks): each is parsed once.
_ip = functools.lru_cache(maxsize=1 << 15)(ipaddress.ip_address)


@functools.lru_cache(maxsize=1 << 15)
def _subnet(ip_with_prefix: str) -> Net:
    return ipaddress.ip_interface(ip_with_prefix).network


@functools.lru_cache(maxsize=1 << 17)
def _net(cidr: str) -> Net:
    """Parsed once per CIDR: a pass asks for every block of every node (5,000 nodes'
    blocks several times a pass), and ipaddress parsing costs microseconds each."""
    return ipaddress.ip_network(cidr, strict=False)


def pool_for(block: str, pools: Pools) -> IPPool | None:
    """The enabled pool that contains `block` (the most specific when pools overlap)."""
    return _pool_for(block, tuple(records(pools)))


@functools.lru_cache(maxsize=1 << 16)
def _pool_for(block: str, pools: tuple[IPPool, ...]) -> IPPool | None:
    # Cached: a pass asks for every block of every node, several times (5,000 nodes: 10,000
    # blocks), and pools are few and immutable records, so (block, pools) is a cheap key.
    b = _net(block)
    best: IPPool | None = None
    for p in pools:
        if p.disabled:
            continue
        pn = _net(p.cidr)
        if pn.version == b.version and b.subnet_of(pn):  # type: ignore[arg-type]
            if best is None or pn.prefixlen > _net(best.cidr).prefixlen:
                best = p
    return best


ByNode = Mapping[str, tuple[str, ...]]  # node name -> its blocks, as blocks_by_node gives them


def blocks_by_node(nodes: Nodes, blocks: Blocks) -> dict[str, tuple[str, ...]]:
    """node name -> its blocks (affinities, then pod_cidrs), sorted and de-duplicated.
    Only nodes that exist: an affinity left behind by a deleted node routes nowhere."""
    nodes = records(nodes)
    names = {n.name for n in nodes}
    out: dict[str, set[str]] = {n.name: {_canonical(c) for c in n.pod_cidrs} for n in nodes}
    for b in records(blocks):
        if b.node in names:
            out[b.node].add(_canonical(b.cidr))
    return {k: tuple(sorted(v, key=_sort_key)) if len(v) > 1 else tuple(v) for k, v in out.items()}


def grouped(nodes: Nodes, blocks: Blocks, by_node: ByNode | None) -> ByNode:
    """`by_node` when the caller grouped the blocks already (once a pass), else
    blocks_by_node(nodes, blocks)."""
    return by_node if by_node is not None else blocks_by_node(nodes, blocks)


@functools.lru_cache(maxsize=1 << 17)
def _canonical(cidr: str) -> str:
    return str(_net(cidr))


@functools.lru_cache(maxsize=1 << 17)
def _sort_key(cidr: str) -> tuple[int, int, int]:
    n = _net(cidr)
    return n.version, int(n.network_address), n.prefixlen


def same_subnet(a: Node, b: Node, version: int = 4) -> bool:
    """True when b's address of IP version `version` lies in a's subnet of that version
    (a.ip / a.ip6 carries the prefix)."""
    mine, theirs = (a.ip if version == 4 else a.ip6), b.address_of(version)
    if not mine or not theirs:
        return False
    return _ip(theirs) in _subnet(mine)


def with_own_prefix(nodes: Mapping[str, Node], me: str, node_ip: str, node_ip6: str = "") -> Mapping[str, Node]:
    """`nodes` with MY node's address carrying the prefix of my uplink (`node_ip`,
    "192.168.100.11/24") when the datastore could not give one: a Kubernetes Node's
    InternalIP has no prefix, and as a /32 every peer would count as "another subnet"
    (direct mode routes nothing, crossSubnet always encapsulates, BIRD's kernel export
    accepts no gateway).  Only when the InternalIP lies in the uplink's subnet; an
    annotation (ip_from_status False) always wins.  Peers are then judged by whether their
    address lies in this subnet (same_subnet), so their own prefix is never needed."""
    mine = nodes.get(me)
    if mine is None:
        return nodes
    fixed = mine
    if mine.ip_from_status and node_ip:
        fixed = _prefixed(fixed, "ip", node_ip)
    if node_ip6 and fixed.ip6.endswith("/128"):
        # IPv6: a /128 is what the Node's status (or a bare annotation) gives
        fixed = _prefixed(fixed, "ip6", node_ip6)
    if fixed is mine:
        return nodes
    out = dict(nodes)
    out[me] = fixed
    return out


def _prefixed(node: Node, field: str, uplink_ip: str) -> Node:
    """`node` with its address in `field` given the prefix of `uplink_ip`, when it lies in
    that network; else `node` unchanged."""
    try:
        net = ipaddress.ip_interface(uplink_ip).network
        addr = ipaddress.ip_address(getattr(node, field).split("/")[0])
    except ValueError:
        return node
    if addr.version != net.version or addr not in net:
        return node
    return dataclasses.replace(node, **{field: f"{addr}/{net.prefixlen}"})


def _by_name(nodes: list[Node]) -> dict[str, Node]:
    return {n.name: n for n in nodes}


def remote_routes(nodes: Nodes, pools: Pools, blocks: Blocks, me: str, *, uplink: str = DEFAULT_UPLINK,
                  by_node: ByNode | None = None) -> frozenset[Route]:
    """Routes to every remote node's blocks in non-bgp pools (see the module doc).
    `by_node`: blocks_by_node(nodes, blocks) when the caller has it already."""
    nodes = records(nodes)
    by_name = _by_name(nodes)
    mine = by_name.get(me)
    if mine is None:
        return frozenset()  # my own Node record is not known yet: nothing is safe to route
    pools = tuple(records(pools))
    routes: set[Route] = set()
    for name, cidrs in grouped(nodes, blocks, by_node).items():
        if name != me:
            routes.update(node_routes(by_name[name], cidrs, mine, pools, uplink))
    return frozenset(routes)


def node_routes(peer: Node, cidrs: Iterable[str], mine: Node, pools: tuple[IPPool, ...],
                uplink: str = DEFAULT_UPLINK) -> list[Route]:
    """The routes to one remote node's blocks of both families (remote_routes, node by
    node: the incremental routing calc redoes only the nodes that changed)."""
    near: dict[int, bool] = {}
    out = []
    for cidr in cidrs:
        version = version_of(cidr)
        if not peer.address_of(version):
            continue
        pool = _pool_for(cidr, pools)
        if pool is None:
            continue
        if version not in near:
            near[version] = same_subnet(mine, peer, version)
        r = _route_for(cidr, pool, peer, near[version], uplink, version)
        if r is not None:
            out.append(r)
    return out


def _route_for(cidr: str, pool: IPPool, peer: Node, near: bool, uplink: str, version: int = 4) -> Route | None:
    gw = peer.address_of(version)
    plain = Route(dst=cidr, dev=uplink, gateway=gw)
    if pool.mode == "direct":
        return Route(dst=cidr, dev=uplink, gateway=gw, onlink=True) if near else None
    if pool.mode == "vxlan":
        if pool.cross_subnet and near:
            return plain
        vtep, mac = peer.vtep_of(version)
        if not vtep or not mac:
            return None
        return Route(dst=cidr, dev=VXLAN_DEVICES[version], gateway=vtep, onlink=True)
    if pool.mode == "ipip" and version == 4:
        if pool.cross_subnet and near:
            return plain
        return Route(dst=cidr, dev=IPIP_DEVICE, gateway=peer.address, onlink=True)
    return None  # bgp: BIRD's job


def off_subnet_nodes(nodes: Nodes, pools: Pools, blocks: Blocks, me: str, mode: str,
                     by_node: ByNode | None = None) -> tuple[str, ...]:
    """Remote nodes with blocks in an enabled pool of `mode` that are NOT on my subnet.
    For "direct" they get no route at all; for "bgp" BIRD learns their blocks but the
    kernel export refuses them (the next hop is not on my link and the router in between
    knows no pod blocks).  Either way their pods are unreachable, so the agent says so."""
    nodes = records(nodes)
    by_name = _by_name(nodes)
    mine = by_name.get(me)
    if mine is None:
        return ()
    pools = tuple(records(pools))
    out = []
    for name, cidrs in grouped(nodes, blocks, by_node).items():
        if name != me and mode in far_modes(by_name[name], cidrs, mine, pools):
            out.append(name)
    return tuple(sorted(out))


def far_modes(peer: Node, cidrs: Iterable[str], mine: Node, pools: tuple[IPPool, ...]) -> frozenset[str]:
    """The modes of the enabled pools holding those of `peer`'s blocks whose family's
    address of peer is not on my subnet of that family (off_subnet_nodes, node by node)."""
    out = set()
    for c in cidrs:
        p = _pool_for(c, pools)
        v = version_of(c)
        if p is not None and p.mode not in out and peer.address_of(v) and not same_subnet(mine, peer, v):
            out.add(p.mode)
    return frozenset(out)


def unreachable_direct_nodes(nodes: Nodes, pools: Pools, blocks: Blocks, me: str) -> tuple[str, ...]:
    """Remote nodes with blocks in a direct pool that are NOT on my subnet: they get no
    route (a next hop behind a router cannot be used on-link), so the agent can say so."""
    return off_subnet_nodes(nodes, pools, blocks, me, "direct")


def local_block_routes(nodes: Nodes, pools: Pools, blocks: Blocks, me: str, *, kind: str = "blackhole",
                       by_node: ByNode | None = None) -> frozenset[Route]:
    """Blackhole (or unreachable, kind="unreachable") routes for my own blocks, in every
    mode: traffic to an unused address of my block is dropped here rather than sent out
    of the default route (pod /32 routes are more specific and win).  In bgp pools BIRD's
    static protocol announces the block, but keeps it out of the kernel; this is the
    kernel's copy (as Calico installs one)."""
    if kind not in ("blackhole", "unreachable"):
        raise ValueError(f"local block route kind must be blackhole or unreachable, not {kind!r}")
    routes = set()
    pools = records(pools)
    for cidr in grouped(nodes, blocks, by_node).get(me, ()):
        pool = pool_for(cidr, pools)
        if pool is not None:
            routes.add(Route(dst=cidr, type=kind))
    return frozenset(routes)


def vxlan_peers(nodes: Nodes, pools: Pools, me: str, version: int = 4
                ) -> tuple[frozenset[FDBEntry], frozenset[Neighbor]]:
    """Static FDB (VTEP MAC -> node underlay IP) and neighbour (VTEP IP -> VTEP MAC)
    entries of the vxlan device of IP version `version` for every remote node that
    published a VTEP of that version, when an enabled vxlan pool of that version exists.
    With crossSubnet the same-subnet entries are harmless and keep a later mode change
    cheap, so they are not filtered."""
    if not any(p.mode == "vxlan" and not p.disabled and version_of(p.cidr) == version for p in records(pools)):
        return frozenset(), frozenset()
    fdb, neigh = set(), set()
    for n in records(nodes):
        entry = vxlan_entry(n, version) if n.name != me else None
        if entry is not None:
            fdb.add(entry[0])
            neigh.add(entry[1])
    return frozenset(fdb), frozenset(neigh)


def vxlan_entry(n: Node, version: int = 4) -> tuple[FDBEntry, Neighbor] | None:
    """The FDB and neighbour entry of one node's published VTEP of IP version `version`
    (None: it published none, or has no underlay address of that version)."""
    vtep, mac = n.vtep_of(version)
    if not n.address_of(version) or not vtep or not mac:
        return None
    mac = mac.lower()
    dev = VXLAN_DEVICES[version]
    return FDBEntry(mac=mac, dst=n.address_of(version), dev=dev), Neighbor(ip=vtep, mac=mac, dev=dev)


def with_derived_vteps(nodes: Nodes, pools: Pools, blocks: Blocks, by_node: ByNode | None = None) -> list[Node]:
    """Nodes with the VTEP each would publish filled in where it is missing: the first
    address of its first vxlan block and the MAC hashed from its name (vtep_for).  For the
    kubernetes datastore, where agents have read-only access and cannot publish; every
    agent derives the same values the VTEP's owner programs on its own device."""
    nodes = records(nodes)
    by_node = grouped(nodes, blocks, by_node)  # once, not once per node (5,000 nodes: minutes)
    pools = tuple(records(pools))
    return [derived_vtep(n, by_node.get(n.name, ()), pools) for n in nodes]


def derived_vtep(n: Node, cidrs: Iterable[str], pools: tuple[IPPool, ...]) -> Node:
    """One node of with_derived_vteps: `n` with its VTEP of each family filled in where
    it has none of that family."""
    for version in (4, 6):
        if not all(n.vtep_of(version)):
            block = _first_block(cidrs, pools, "vxlan", version)
            if block:
                n = _with_vtep(n, block)
    return n


@functools.lru_cache(maxsize=1 << 14)
def _with_vtep(n: Node, block: str) -> Node:
    # Cached: every routing pass derives every node's VTEP again (a node add at 5,000
    # nodes rebuilt 5,000 records and hashed 5,000 names), and both inputs are immutable.
    addr, mac = vtep_for(n.name, block)
    if version_of(block) == 6:
        return dataclasses.replace(n, vxlan_tunnel_addr6=addr, vxlan_tunnel_mac6=mac)
    return dataclasses.replace(n, vxlan_tunnel_addr=addr, vxlan_tunnel_mac=mac)


def vtep_mac(node_name: str, version: int = 4) -> str:
    """A stable MAC for a node's VTEP: hashed from the node name, so a restarted agent
    (or a rebuilt device) keeps the MAC every peer already has in its FDB.  The first
    octet is made locally administered (bit 1 set) and unicast (bit 0 clear).  The IPv6
    VTEP gets a MAC of its own (hashed from the name and "/v6")."""
    if not node_name:
        raise ValueError("vtep_mac needs a node name")
    seed = node_name if version == 4 else node_name + "/v6"
    b = bytearray(hashlib.sha256(seed.encode()).digest()[:6])
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def vtep_for(node_name: str, block_cidr: str) -> tuple[str, str]:
    """(VTEP address, VTEP MAC) for a node whose first vxlan block is `block_cidr`: the
    address is the block's first address, as Calico does, so IPAM must never hand it to
    a pod (see tunnel_block())."""
    net = _net(block_cidr)
    return str(net.network_address), vtep_mac(node_name, net.version)


def tunnel_block(nodes: Nodes, pools: Pools, blocks: Blocks, me: str, mode: str,
                 by_node: ByNode | None = None, version: int = 4) -> str | None:
    """My first block (lowest CIDR) of IP version `version` in an enabled pool of `mode`
    ("vxlan" or "ipip"): its first address becomes the tunnel device's address.  None
    when I own no such block."""
    return _first_block(grouped(nodes, blocks, by_node).get(me, ()), records(pools), mode, version)


def _first_block(cidrs: Iterable[str], pools: Pools, mode: str, version: int = 4) -> str | None:
    pools = tuple(records(pools))
    for cidr in cidrs:
        pool = _pool_for(cidr, pools)
        if pool is not None and pool.mode == mode and _net(cidr).version == version:
            return cidr
    return None
