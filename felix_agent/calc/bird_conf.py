"""BIRD 2 configuration for one node (pure): the model in, bird.conf text out.

What the rendered config does, and why:
- `router id` is the node's IPv4 address; the AS is the node's own (Node.as_number) or
  the cluster default, so per-rack/per-node AS designs work: sessions between different
  ASes are eBGP (and multihop when the peer is not on my subnet).
- `protocol direct` covers only the uplink: it gives BIRD the connected subnet so iBGP
  next hops (recursive by default) resolve.  When ipip pools exist, nodes on other
  subnets get device routes in `tortie_nexthops` so their next hops resolve too (the
  kernel export then moves those routes onto tunl0).  Neither is ever exported.
- `protocol static tortie_blocks` holds a blackhole (or unreachable) route per local
  block: it is what the node announces, and it is never exported to the kernel.
- `protocol kernel` imports nothing and exports only BGP-learnt routes inside enabled
  bgp/ipip pools (vxlan/direct pools are the agent's own routes, proto 80).  bgp-mode
  routes whose next hop is not on my subnet are refused (the kernel could not use them
  on-link); ipip-mode routes go out `tunl0` onlink (crossSubnet: only across subnets).
  Routes land as `proto bird`.
- BGP imports only prefixes inside enabled pools (never one of my own blocks) and exports
  only my blocks; a route reflector also exports what it learnt (that is reflection).
Graceful restart (RFC 4724), so that restarting BIRD (the agent's pod replaced in a rolling
upgrade kills it) interrupts no forwarding: every session announces `graceful restart on`, so
a peer whose BIRD vanishes without a NOTIFICATION keeps its routes (stale) until it is back
and has sent them again; and the kernel protocol takes part in the recovery: a BIRD started
with -R (the agent does so when the kernel still holds proto bird routes, see
dataplane/bird.py) neither prunes those routes nor exports new ones until its peers have
sent End-of-RIB, or `graceful restart wait` runs out (30 s, not 240: a peer that is down
must not hold a new route back for minutes).
Sessions: full mesh when no node has route_reflector_cluster_id (Mesh_<ip>); otherwise
reflectors peer with everyone (rr client for non-reflectors of the same AS) and the
others peer only with reflectors (Node_<ip>).  BGPPeer records add Peer_<name>
sessions, for every node (node "") or one node.
IPv6 (pools of IPv6 CIDRs in bgp mode): separate IPv6 sessions between the nodes' IPv6
addresses (Node.ip6), each with an ipv6 channel, alongside the IPv4 ones, and their own
static, kernel and filters (suffix 6).  Chosen over an ipv6 channel on the IPv4 sessions:
there BGP would carry an IPv4-mapped next hop (::ffff:a.b.c.d) that the kernel cannot use
unless every session is given an IPv6 next-hop address by hand; an IPv6 session's next hop
is simply the peer's IPv6 address on the shared link, the same next-hop rules (on my IPv6
subnet, else refused) hold, and it is what Calico runs (its bird6 peers over node IPv6
addresses).  The router id stays the node's IPv4 address (a 32-bit id derived from the
node name when it has none).
Passwords (TCP MD5): a session with a password file (BGPPeer passwordFile, or the agent's
mesh password file for node-to-node sessions) gets `include "<secrets_dir>/<protocol>.conf";`
in its protocol block; the agent writes `password "...";` into that file (mode 0600) from the
password file.  The rendered text, the plan, logs and status therefore only ever hold paths.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from felix_agent.calc.routes import (Blocks, ByNode, Nodes, Pools, grouped, ip_address, pool_for, records,
                                     same_subnet, version_of)
from felix_agent.model import DEFAULT_AS, BGPPeer, Node

STATIC_PROTOCOL = "tortie_blocks"
NEXTHOP_PROTOCOL = "tortie_nexthops"
SUFFIX = {4: "", 6: "6"}  # the IPv6 protocols, filters and template are named <ipv4 name>6


@dataclass(frozen=True)
class Session:
    """One BGP protocol of the rendered config."""

    name: str
    peer_ip: str
    peer_as: int
    rr_client: bool = False
    multihop: bool = False
    password_file: str = ""  # the node-local file holding this session's password


def password_include(secrets_dir: str, session: str) -> str:
    """The file BIRD includes for `session`'s password line (written by the agent)."""
    return f"{secrets_dir.rstrip('/')}/{session}.conf"


def protocol_name(prefix: str, ident: str) -> str:
    """A BIRD protocol name: letters, digits and '_' only, so IPs and peer names map
    deterministically (Mesh_192_168_100_12, Peer_tor_a)."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9]', '_', ident)}"


def _cluster_id(node: Node) -> str:
    cid = node.route_reflector_cluster_id.strip()
    try:
        if cid.isdigit():
            return str(ipaddress.IPv4Address(int(cid)))
        return str(ipaddress.IPv4Address(cid))
    except ValueError:
        raise ValueError(f"node {node.name}: route_reflector_cluster_id {cid!r} must be an "
                         "IPv4-style id like 244.0.0.1 (or a 32-bit number)") from None


def sessions(nodes: Nodes, peers: Iterable[BGPPeer] | Mapping[str, BGPPeer], me: str, *, default_as: int = DEFAULT_AS,
             mesh_password_file: str = "", version: int = 4) -> list[Session]:
    """The BGP sessions of IP version `version` node `me` opens, between the nodes'
    addresses of that version, sorted by name (see the module doc)."""
    nodes = [n for n in records(nodes) if n.address_of(version)]
    mine = next((n for n in nodes if n.name == me), None)
    if mine is None:
        raise ValueError(f"node {me!r} is unknown or has no IPv{version} address; cannot render BGP")
    reflectors = frozenset(n.name for n in nodes if n.route_reflector_cluster_id)
    check_reflector(mine, reflectors)
    out: dict[str, Session] = {}
    for n in nodes:
        s = node_session(n, mine, reflectors, default_as=default_as, mesh_password_file=mesh_password_file,
                         version=version)
        if s is not None:
            out[s.peer_ip] = s
    return with_peer_sessions(out, peers, mine, default_as=default_as, version=version)


def check_reflector(mine: Node, reflectors: frozenset[str]) -> None:
    """A reflector's bad cluster id fails here, before any text is made."""
    if mine.name in reflectors:
        _cluster_id(mine)


def node_session(n: Node, mine: Node, reflectors: frozenset[str], *, default_as: int = DEFAULT_AS,
                 mesh_password_file: str = "", version: int = 4) -> Session | None:
    """The session of IP version `version` `mine` opens to node `n` (None: none, e.g. two
    non-reflectors, n is mine, or n has no address of that version); ValueError when n's
    address is not of that version.  `reflectors`: the names of the nodes with an address
    of that version and a route_reflector_cluster_id."""
    if n.name == mine.name or not n.address_of(version):
        return None
    ip = ip_address(n.address_of(version), f"node {n.name}", version)
    my_as = mine.as_number or default_as
    peer_as = n.as_number or default_as
    if not reflectors:
        name = protocol_name("Mesh", ip)
    elif mine.name in reflectors or n.name in reflectors:
        name = protocol_name("Node", ip)
    else:
        return None  # two non-reflectors never peer directly
    rr_client = mine.name in reflectors and n.name not in reflectors and peer_as == my_as
    return Session(name, ip, peer_as, rr_client=rr_client,
                   multihop=peer_as != my_as and not same_subnet(mine, n, version),
                   password_file=mesh_password_file)


def with_peer_sessions(by_ip: Mapping[str, Session], peers: Iterable[BGPPeer] | Mapping[str, BGPPeer], mine: Node,
                       *, default_as: int = DEFAULT_AS, version: int = 4) -> list[Session]:
    """The node sessions (peer IP -> session) and the BGPPeer ones of `mine` of IP version
    `version`, sorted by name."""
    me = mine.name
    my_as = mine.as_number or default_as
    out = dict(by_ip)
    for p in sorted(records(peers), key=lambda p: p.name):
        if p.node not in ("", me):
            continue
        if (":" in p.peer_ip) != (version == 6):
            continue  # a peer of the other family: a session of the other version
        ip = ip_address(p.peer_ip, f"BGPPeer {p.name}", version)
        if ip == mine.address_of(version) or ip in out:
            continue  # already a node session (or myself): one session per neighbour
        if not 0 < p.as_number < 2**32:
            raise ValueError(f"BGPPeer {p.name}: AS number {p.as_number} is out of range")
        near = ipaddress.ip_address(ip) in ipaddress.ip_interface(mine.ip if version == 4 else mine.ip6).network
        out[ip] = Session(protocol_name("Peer", p.name), ip, p.as_number,
                          multihop=p.as_number != my_as and not near, password_file=p.password_file)
    return sorted(out.values(), key=lambda s: s.name)


def _prefix_set(cidrs: list[str]) -> str:
    return "[ " + ", ".join(f"{c}+" for c in cidrs) + " ]"


def _match(cidrs: list[str]) -> str:
    """A BIRD condition 'net is inside one of cidrs' (false when there are none: BIRD
    has no empty prefix-set literal)."""
    return f"net ~ {_prefix_set(cidrs)}" if cidrs else "false"


def bird_config(nodes: Nodes, peers: Iterable[BGPPeer] | Mapping[str, BGPPeer], pools: Pools,
                blocks: Blocks, me: str, *, listen_port: int = 179,
                uplink: str = "eth0", default_as: int = DEFAULT_AS,
                local_route: str = "blackhole", mesh_password_file: str = "",
                secrets_dir: str = "", sess: list[Session] | None = None,
                by_node: ByNode | None = None, sess6: list[Session] | None = None,
                far: list[Node] | None = None) -> str:
    """The bird2 configuration text for node `me` (see the module doc).  Raises
    ValueError for input that cannot make a valid config (unknown node, non-IPv4
    address, bad cluster id, out-of-range port).  `sess` and `by_node`: sessions() and
    blocks_by_node() of the same input, when the caller has them already (`far`: far_nodes()); `sess6` the
    IPv6 sessions (computed when None and IPv6 bgp pools exist and I have an IPv6 address)."""
    if local_route not in ("blackhole", "unreachable"):
        raise ValueError(f"local_route must be blackhole or unreachable, not {local_route!r}")
    if not 0 < listen_port < 65536:
        raise ValueError(f"listen_port {listen_port} is out of range")
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", uplink):
        raise ValueError(f"uplink {uplink!r} is not an interface name")
    nodes = records(nodes)
    pools = records(pools)
    mine = next((n for n in nodes if n.name == me), None)
    if sess is None:
        # an IPv6-only node (no IPv4 address, an IPv6 one) has IPv6 sessions only
        ipv6_only = mine is not None and not mine.address and mine.address6
        sess = [] if ipv6_only else sessions(nodes, peers, me, default_as=default_as,
                                             mesh_password_file=mesh_password_file)
    if mine is None:
        raise ValueError(f"node {me!r} is unknown; cannot render BGP")
    if sess6 is None:
        sess6 = (sessions(nodes, peers, me, default_as=default_as, mesh_password_file=mesh_password_file,
                          version=6) if wants_ipv6(pools, mine) else [])
    if any(s.password_file for s in sess + sess6) and not secrets_dir.startswith("/"):
        raise ValueError(f"secrets_dir {secrets_dir!r} must be an absolute path when sessions have passwords")
    by_node = grouped(nodes, blocks, by_node)

    L: list[str] = []
    w = L.append
    w(f"# BIRD config of tortie node {me}, rendered by felix_agent.calc.bird_conf: edits are overwritten.")
    w(f"router id {router_id(mine)};")
    w("timeformat protocol iso long;  # fixed-width 'since' column for the protocols parser")
    w("graceful restart wait 30;  # the longest a restart (bird -R) defers exports for a silent peer")
    w("")
    w("protocol device { scan time 10; }")
    if mine.address:
        _family(w, 4, nodes, pools, by_node, mine, sess, uplink, default_as, local_route, listen_port, secrets_dir,
                far)
    if sess6 or wants_ipv6(pools, mine):
        w("")
        w("# ---- IPv6: sessions between the nodes' IPv6 addresses (see the module doc) ----")
        _family(w, 6, nodes, pools, by_node, mine, sess6, uplink, default_as, local_route, listen_port,
                secrets_dir, [])
    return "\n".join(L) + "\n"


def wants_ipv6(pools: Pools, mine: Node) -> bool:
    """IPv6 sessions are rendered when I have an IPv6 address and an enabled IPv6 pool
    is in bgp mode."""
    return bool(mine.address6) and any(not p.disabled and p.mode == "bgp" and version_of(p.cidr) == 6
                                       for p in records(pools))


def router_id(node: Node) -> str:
    """The node's IPv4 address; without one, a 32-bit id hashed from its name (BIRD
    wants an IPv4-shaped id even on an IPv6-only node)."""
    if node.address:
        return node.address
    return str(ipaddress.IPv4Address(int.from_bytes(hashlib.sha256(node.name.encode()).digest()[:4], "big")))


def _family(w, version: int, nodes: list[Node], pools: list, by_node: ByNode, mine: Node, sess: list[Session],
            uplink: str, default_as: int, local_route: str, listen_port: int, secrets_dir: str,
            far: list[Node] | None) -> None:
    """The protocols, filters, template and sessions of one IP version."""
    x = SUFFIX[version]
    ch = f"ipv{version}"
    me = mine.name
    my_ip = mine.address_of(version)
    my_as = mine.as_number or default_as
    my_net = str(ipaddress.ip_interface(mine.ip if version == 4 else mine.ip6).network) if my_ip else ""
    enabled = [p for p in pools if not p.disabled and version_of(p.cidr) == version]
    by_mode: dict[str, list[str]] = {m: sorted(str(ipaddress.ip_network(p.cidr, strict=False))
                                               for p in enabled if p.mode == m)
                                     for m in ("bgp", "direct", "vxlan", "ipip")}
    ipip_cross = sorted(p.cidr for p in enabled if p.mode == "ipip" and p.cross_subnet)
    ipip_always = sorted(p.cidr for p in enabled if p.mode == "ipip" and not p.cross_subnet)
    all_pools = sorted(str(ipaddress.ip_network(p.cidr, strict=False)) for p in enabled)
    my_blocks = [c for c in by_node.get(me, ()) if version_of(c) == version and pool_for(c, pools) is not None]
    reflector = bool(mine.route_reflector_cluster_id)

    w("")
    w("# The uplink's connected subnet, only so that BGP next hops resolve.")
    w(f'protocol direct{" tortie_direct6" if x else ""} {{ {ch}; interface "{uplink}"; }}')
    w("")
    w("# Announced blocks; kept out of the kernel (the agent and the pods' /32 routes own it).")
    w(f"protocol static {STATIC_PROTOCOL}{x} {{")
    w(f"  {ch};")
    for c in my_blocks:
        w(f"  route {c} {local_route};")
    w("}")
    if by_mode["ipip"] and far is None:
        far = far_nodes(nodes, mine)
    if by_mode["ipip"] and far:
        w("")
        w("# Nodes behind a router: device routes so their next hops resolve (ipip carries them).")
        w(f"protocol static {NEXTHOP_PROTOCOL} {{")
        w("  ipv4;")
        for n in far:
            w(f'  route {n.address}/32 via "{uplink}";')
        w("}")
    w("")
    w(f"filter tortie_kernel_export{x} {{")
    w("  if source != RTS_BGP then reject;")
    if ipip_always:
        w(f"  if {_match(ipip_always)} then {{ ifname = \"tunl0\"; onlink = true; accept; }}")
    if ipip_cross:
        w(f"  if {_match(ipip_cross)} then {{")
        w(f"    if gw !~ {my_net} then {{ ifname = \"tunl0\"; onlink = true; }}")
        w("    accept;")
        w("  }")
    w(f"  if {_match(by_mode['bgp'])} then {{")
    w(f"    if gw ~ {my_net} then accept;")
    w("    reject;  # next hop behind a router: unusable without a tunnel")
    w("  }")
    w("  reject;  # vxlan/direct pools are the agent's routes; nothing outside the pools")
    w("}")
    w("")
    w(f"filter tortie_bgp_import{x} {{")
    if my_blocks:
        w(f"  if net ~ [ {', '.join(my_blocks)} ] then reject;  # my own blocks")
    w(f"  if {_match(all_pools)} then accept;")
    w("  reject;")
    w("}")
    w("")
    w(f"filter tortie_bgp_export{x} {{")
    w(f'  if proto = "{STATIC_PROTOCOL}{x}" then accept;')
    if reflector:
        w(f"  if source = RTS_BGP && {_match(all_pools)} then accept;  # reflection")
    w("  reject;")
    w("}")
    w("")
    w(f"protocol kernel{' tortie_kernel6' if x else ''} {{")
    w("  scan time 10;  # re-adds routes someone deleted")
    w("  graceful restart on;  # after a restart (bird -R) the old routes stay until the peers resent theirs")
    w(f"  {ch} {{ import none; export filter tortie_kernel_export{x}; }};")
    w("}")
    if not sess:
        return
    w("")
    w(f"template bgp tortie_peer{x} {{")
    w(f"  local {my_ip} port {listen_port} as {my_as};")
    w("  connect delay time 1;")
    w("  connect retry time 3;")
    w("  error wait time 1, 10;")
    w("  graceful restart on;  # peers keep my routes while my BIRD restarts")
    w(f"  {ch} {{ import filter tortie_bgp_import{x}; export filter tortie_bgp_export{x}; }};")
    w("}")
    cid = _cluster_id(mine) if reflector and any(s.rr_client for s in sess) else ""
    for s in sess:
        w(_session_text(s, x, listen_port, cid, secrets_dir))


def far_nodes(nodes: Iterable[Node], mine: Node) -> list[Node]:
    """The other nodes whose IPv4 address is behind a router (not on my subnet), by address."""
    far = [n for n in nodes if n.name != mine.name and n.address and not same_subnet(mine, n)]
    return sorted(far, key=address_order)


def address_order(n: Node) -> tuple[int, int]:
    """Sort key of a node's address: ipaddress's own order, across families too (a
    mistyped IPv6 address in the IPv4 field must not make sorting raise)."""
    ip = ipaddress.ip_address(n.address)
    return ip.version, int(ip)


@functools.lru_cache(maxsize=1 << 14)
def _session_text(s: Session, x: str, listen_port: int, cluster_id: str, secrets_dir: str) -> str:
    # Cached: a full mesh of 5,000 nodes renders 5,000 of these every time any node changes.
    L = ["", f"protocol bgp {s.name} from tortie_peer{x} {{",
         f"  neighbor {s.peer_ip} port {listen_port} as {s.peer_as};"]
    if s.multihop:
        L.append("  multihop;")
    if s.rr_client:
        L.append("  rr client;")
        L.append(f"  rr cluster id {cluster_id};")
    if s.password_file:
        L.append(f'  include "{password_include(secrets_dir, s.name)}";  # password from {s.password_file}')
    L.append("}")
    return "\n".join(L)
