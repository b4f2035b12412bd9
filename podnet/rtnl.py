"""A small synchronous rtnetlink client: just the requests the pod plumbing's hot path makes.

Why not pyroute2 here: its 0.9 sync API runs an asyncio loop for every call (0.2-0.4 ms)
and encodes each message through generic NLA classes (75-210 us), so one pod setup cost
~7 ms of which the kernel needed 1-2; and importing it costs the CNI binary 110-140 ms.
This is one socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE), struct-packed messages and a
blocking recv, stdlib only (`_socket`, not `socket`, which would pull in enum).

Layouts are those of the kernel uapi headers: linux/netlink.h (nlmsghdr, nlmsgerr),
linux/rtnetlink.h (ifinfomsg, ifaddrmsg, rtmsg, rtattr), linux/if_link.h (IFLA_*),
linux/veth.h (VETH_INFO_PEER), linux/if_addr.h (IFA_*).  All native byte order.

A socket talks to the network namespace it was CREATED in, whichever thread uses it
later: create it inside nsutil.entered(fd) to reach a pod's namespace.  Every request
asks for an ACK and waits for it, so a kernel refusal surfaces right at the call that
caused it, as NetlinkError (an OSError with the kernel's errno and its strerror text).
"""
from __future__ import annotations

import _socket
import os
import struct

from podnet.records import Record

# linux/netlink.h
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acks without a copy of our request: we only read their errno
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300  # ROOT | MATCH: every object of the kind
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3

# linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTPROT_BOOT = 3  # what `ip route add` uses: routes print exactly as an admin would type them
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RTEXT_FILTER_SKIP_STATS = 1 << 3  # link replies without ~300 bytes of counters we never read

# linux/if_link.h, linux/veth.h, linux/if.h
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_OPERSTATE = 1, 3, 4, 5, 16
IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD, IFLA_EXT_MASK = 18, 27, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFF_UP = 0x1
# RFC 2863 operational states (IF_OPER_*), as `ip link` prints them
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")

# linux/if_addr.h
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, pad, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTA = struct.Struct("=HH")  # rtattr: len (header included, padding not), type
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused a request: errno and strerror as for a failed syscall."""


class Link(Record):
    """What the plumbing needs to know about one link (from an RTM_NEWLINK reply)."""

    __slots__ = ("index", "name", "kind", "mac", "group", "up", "peer_index", "operstate")

    def __init__(self, index: int, name: str, kind: str | None, mac: str, group: int, up: bool,
                 peer_index: int | None, operstate: str = "UNKNOWN") -> None:
        self.index = index
        self.name = name
        self.kind = kind  # IFLA_INFO_KIND: "veth", "bridge"...; None for a device without one (lo)
        self.mac = mac  # "aa:bb:cc:dd:ee:ff", "" if the device has none
        self.group = group
        self.up = up  # administratively (IFF_UP)
        self.peer_index = peer_index  # IFLA_LINK: a veth's peer, as an index in the PEER's namespace
        self.operstate = operstate  # "UP" once up with carrier (both ends of a veth up)


class Route(Record):
    """One route of a dump: what CHECK compares."""

    __slots__ = ("dst", "gateway", "oif", "scope", "table")

    def __init__(self, dst: str, gateway: str, oif: int | None, scope: int, table: int) -> None:
        self.dst = dst  # "10.0.0.5/32", "0.0.0.0/0", "::/0"
        self.gateway = gateway  # "" without one
        self.oif = oif
        self.scope = scope
        self.table = table


def _attr(kind: int, payload: bytes) -> bytes:
    n = _RTA.size + len(payload)
    return _RTA.pack(n, kind) + payload + b"\0" * (-n % 4)  # each attribute starts 4-aligned


def _name(s: str) -> bytes:
    return s.encode() + b"\0"  # IFLA_IFNAME is a C string: the kernel checks for the NUL


def _attrs(buf: bytes, off: int = 0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + _RTA.size <= len(buf):
        n, kind = _RTA.unpack_from(buf, off)
        if n < _RTA.size:
            break
        # The top two bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER, not part of the type.
        out[kind & 0x3FFF] = buf[off + _RTA.size:off + n]
        off += (n + 3) & ~3
    return out


def _family(addr: str) -> int:
    return _socket.AF_INET6 if ":" in addr else _socket.AF_INET


def _packed(addr: str) -> bytes:
    return _socket.inet_pton(_family(addr), addr)


def _link(payload: bytes) -> Link:
    _fam, _type, index, flags, _change = _IFINFO.unpack_from(payload)
    a = _attrs(payload, _IFINFO.size)
    kind = _attrs(a[IFLA_LINKINFO]).get(IFLA_INFO_KIND) if IFLA_LINKINFO in a else None
    mac = a.get(IFLA_ADDRESS, b"")
    return Link(index=index,
                name=a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
                kind=kind.rstrip(b"\0").decode() if kind is not None else None,
                mac=":".join(f"{b:02x}" for b in mac),
                group=_U32.unpack(a[IFLA_GROUP])[0] if IFLA_GROUP in a else 0,
                up=bool(flags & IFF_UP),
                peer_index=_U32.unpack(a[IFLA_LINK])[0] if IFLA_LINK in a else None,
                operstate=_operstate(a.get(IFLA_OPERSTATE)))


def _operstate(raw: bytes | None) -> str:
    if not raw:
        return "UNKNOWN"
    return OPERSTATES[raw[0]] if raw[0] < len(OPERSTATES) else str(raw[0])


def _ntop(family: int, raw: bytes) -> str:
    return _socket.inet_ntop(family, raw)


def _route(payload: bytes) -> Route:
    family, dst_len, _src_len, _tos, table, _proto, scope, _type, _flags = _RTMSG.unpack_from(payload)
    a = _attrs(payload, _RTMSG.size)
    dst = _ntop(family, a[RTA_DST]) if RTA_DST in a else ("0.0.0.0" if family == _socket.AF_INET else "::")
    return Route(dst=f"{dst}/{dst_len}",
                 gateway=_ntop(family, a[RTA_GATEWAY]) if RTA_GATEWAY in a else "",
                 oif=_U32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else None,
                 scope=scope,
                 table=_U32.unpack(a[RTA_TABLE])[0] if RTA_TABLE in a else table)  # ids > 255 only here


class Rtnl:
    """One NETLINK_ROUTE socket in the namespace current when it was made.  Not for use
    by two threads at once (replies are matched to requests by sequence number)."""

    def __init__(self) -> None:
        self._sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.bind((0, 0))  # port id 0: the kernel picks a free one
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, mtype: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request, return the payloads of the kernel's replies (none for a plain
        change), raise NetlinkError if it refused.  Ends at the ACK (or a dump's DONE)."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(_HDR.pack(_HDR.size + len(body), mtype, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body)
        replies: list[bytes] = []
        while True:
            # 64 KiB: more than the kernel ever puts in one dump datagram (it caps at 32 KiB),
            # so no message is truncated.
            data = self._sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                n, rtype, _flags, rseq, _pid = _HDR.unpack_from(data, off)
                if n < _HDR.size:
                    break
                if rseq == seq:
                    if rtype in (NLMSG_ERROR, NLMSG_DONE):
                        # ERROR carries -errno (0 = the ACK); DONE ends a dump with its error.
                        err = -_I32.unpack_from(data, off + _HDR.size)[0] if n >= _HDR.size + 4 else 0
                        if err > 0:
                            raise NetlinkError(err, os.strerror(err))
                        return replies
                    replies.append(data[off + _HDR.size:off + n])
                # A stale sequence number can only be left over from an earlier request that
                # raised half-way through reading; it is skipped.
                off += (n + 3) & ~3

    # -- links ---------------------------------------------------------------------------

    def link(self, name: str = "", index: int = 0) -> Link | None:
        """The link called `name` (or with ifindex `index`), or None."""
        body = _IFINFO.pack(0, 0, index, 0, 0) + (_attr(IFLA_IFNAME, _name(name)) if name else b"") + \
            _attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
        try:
            replies = self._request(RTM_GETLINK, 0, body)
        except NetlinkError as e:
            if e.errno == 19:  # ENODEV: no such link
                return None
            raise
        return _link(replies[0])

    def links(self) -> list[Link]:
        """Every link of the namespace (one dump)."""
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
        return [_link(p) for p in self._request(RTM_GETLINK, NLM_F_DUMP, body)]

    def add_veth(self, name: str, peer: str, peer_nsfd: int, mtu: int, mac: str) -> None:
        """A veth pair: `name` here with MAC `mac`, `peer` created straight inside the
        namespace of `peer_nsfd` (never visible here, so no name clash with the node's
        own eth0).  Both ends down; the peer gets a random MAC from the kernel."""
        peer_info = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer)) + \
            _attr(IFLA_NET_NS_FD, _U32.pack(peer_nsfd)) + _attr(IFLA_MTU, _U32.pack(mtu))
        linkinfo = _attr(IFLA_INFO_KIND, b"veth") + \
            _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info))  # the peer is a whole ifinfomsg
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name)) + \
            _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", ""))) + _attr(IFLA_MTU, _U32.pack(mtu)) + \
            _attr(IFLA_LINKINFO, linkinfo)
        # EXCL: an existing link of that name is an error, never silently reused.
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_link(self, index: int, up: bool | None = None, name: str | None = None,
                 group: int | None = None) -> None:
        """Change a link in one request: admin state (ifi_change says which flag bits
        to touch, so the others keep their values), name, group."""
        change = IFF_UP if up is not None else 0
        body = _IFINFO.pack(0, 0, index, IFF_UP if up else 0, change)
        if name is not None:
            body += _attr(IFLA_IFNAME, _name(name))
        if group is not None:
            body += _attr(IFLA_GROUP, _U32.pack(group))
        self._request(RTM_SETLINK, 0, body)

    def del_link(self, index: int) -> None:
        self._request(RTM_DELLINK, 0, _IFINFO.pack(0, 0, index, 0, 0))

    def del_group(self, group: int) -> None:
        """Delete every link in `group` with one request: ifi_index 0 plus IFLA_GROUP makes
        the kernel unregister them all in one batch (one RCU grace period for all, instead
        of one per link).  ENODEV when the group is empty."""
        self._request(RTM_DELLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_GROUP, _U32.pack(group)))

    # -- addresses and routes ----------------------------------------------------------

    def add_addr(self, index: int, addr: str, prefixlen: int, nodad: bool = False) -> None:
        raw = _packed(addr)
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS the same on a
        # non-point-to-point link (what `ip addr add` sends).
        body = _IFADDR.pack(_family(addr), prefixlen, IFA_F_NODAD if nodad else 0, RT_SCOPE_UNIVERSE, index) + \
            _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_route(self, dst: str, dst_len: int, oif: int, gateway: str | None = None,
                  scope: int = RT_SCOPE_UNIVERSE, proto: int = RTPROT_BOOT, replace: bool = False) -> None:
        """A unicast route in the main table.  dst_len 0 is a default route (then `dst` only
        names the family).  replace=True overwrites a route to the same dst (an address
        reused after a leak may still have its old route); else an existing one is EEXIST."""
        family = _family(dst)
        body = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, proto, scope, RTN_UNICAST, 0)
        if dst_len:
            body += _attr(RTA_DST, _packed(dst))
        body += _attr(RTA_OIF, _U32.pack(oif))
        if gateway is not None:
            body += _attr(RTA_GATEWAY, _packed(gateway))
        flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        self._request(RTM_NEWROUTE, flags, body)

    def addrs(self, index: int) -> list[tuple[str, int]]:
        """(address, prefix length) of every address on link `index`, v4 and v6."""
        out = []
        for p in self._request(RTM_GETADDR, NLM_F_DUMP, _IFADDR.pack(0, 0, 0, 0, 0)):
            family, prefixlen, _flags, _scope, idx = _IFADDR.unpack_from(p)
            a = _attrs(p, _IFADDR.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)  # v6 has no IFA_LOCAL
            if idx == index and raw is not None:
                out.append((_ntop(family, raw), prefixlen))
        return out

    def routes(self, family: int) -> list[Route]:
        """The routes of the main table of one family (one dump)."""
        body = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0)
        return [r for r in map(_route, self._request(RTM_GETROUTE, NLM_F_DUMP, body)) if r.table == RT_TABLE_MAIN]
