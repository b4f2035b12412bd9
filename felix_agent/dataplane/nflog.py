"""Packets the flow-log rules (calc/flowlog.py) hand to an NFLOG group, read over
nfnetlink_log (NETLINK_NETFILTER) with the stdlib's socket module.

Why no library: pyroute2 (pinned) speaks nfnetlink for ipset, conntrack and nftables but
not for the log subsystem, and the protocol needed here is three config messages and one
packet message (linux/netfilter/nfnetlink_log.h).

An NFLOG socket belongs to the network namespace it was created in (like every netlink
socket), so `NflogSocket(group, netns)` creates it inside `netns` and may then be read
from any thread.  The kernel copies only the first `copy_range` bytes of each packet
(headers: addresses and ports are all we read) and batches up to `qthresh` packets per
message or `flush_cs` hundredths of a second, so a flood costs few syscalls.  A reader too
slow for the kernel loses packets (ENOBUFS), counted in `overruns`, and carries on.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from podnet.nsutil import entered, netns_path

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
CMD_BIND, CMD_PF_BIND, CMD_PF_UNBIND = 1, 3, 4
COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian group, packed by hand)
_NLA = struct.Struct("=HH")
PROTOS = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}
PORTED = (6, 17, 132)  # protocols whose header starts with source and destination port
# IPv6 extension headers walked to the upper layer: hop-by-hop, routing, destination
# options (length in 8-octet units after the first 8), fragment (always 8 octets).
EXT_HEADERS = (0, 43, 60)
FRAGMENT = 44


class NflogUnavailable(Exception):
    """The kernel refused the group (no nfnetlink_log, or another listener holds it)."""


@dataclass(frozen=True)
class LoggedPacket:
    prefix: str
    src: str
    dst: str
    proto: str  # "tcp", "udp", "sctp", "icmp", "icmpv6" or the protocol number
    dport: int  # 0 without ports


def _attr(kind: int, payload: bytes) -> bytes:
    n = _NLA.size + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * (-n % 4)


def _attrs(buf: bytes, off: int, end: int):
    while off + _NLA.size <= end:
        n, kind = _NLA.unpack_from(buf, off)
        if n < _NLA.size:
            return
        yield kind & 0x3FFF, buf[off + _NLA.size:off + n]
        off += (n + 3) & ~3


def parse_ipv4(payload: bytes) -> tuple[str, str, str, int] | None:
    """(src, dst, proto, dport) of an IPv4 packet's headers; None for anything else."""
    if len(payload) < 20 or payload[0] >> 4 != 4:
        return None
    ihl = (payload[0] & 0x0F) * 4
    proto = payload[9]
    src, dst = str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20]))
    dport = 0
    first_fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF == 0
    if proto in PORTED and first_fragment and len(payload) >= ihl + 4:
        dport = struct.unpack_from("!H", payload, ihl + 2)[0]
    return src, dst, PROTOS.get(proto, str(proto)), dport


def parse_ipv6(payload: bytes) -> tuple[str, str, str, int] | None:
    """(src, dst, proto, dport) of an IPv6 packet's headers, the extension headers skipped
    to the upper layer; None for anything else.  When the copied bytes end inside the
    extension headers, or a fragment is not the first, the last known next header is
    reported without a port."""
    if len(payload) < 40 or payload[0] >> 4 != 6:
        return None
    src, dst = str(ipaddress.IPv6Address(payload[8:24])), str(ipaddress.IPv6Address(payload[24:40]))
    proto, off = payload[6], 40
    while proto in EXT_HEADERS or proto == FRAGMENT:
        if len(payload) < off + 8:
            return src, dst, PROTOS.get(proto, str(proto)), 0
        if proto == FRAGMENT:
            later = struct.unpack_from("!H", payload, off + 2)[0] & 0xFFF8  # fragment offset
            proto, off = payload[off], off + 8
            if later:
                return src, dst, PROTOS.get(proto, str(proto)), 0
        else:
            proto, off = payload[off], off + 8 + payload[off + 1] * 8
    dport = struct.unpack_from("!H", payload, off + 2)[0] if proto in PORTED and len(payload) >= off + 4 else 0
    return src, dst, PROTOS.get(proto, str(proto)), dport


def parse_ip(payload: bytes) -> tuple[str, str, str, int] | None:
    """Either family, by the version nibble."""
    return parse_ipv6(payload) if payload[:1] and payload[0] >> 4 == 6 else parse_ipv4(payload)


def parse_messages(buf: bytes) -> list[LoggedPacket]:
    """Every packet message in one recv()'s worth of netlink messages."""
    out: list[LoggedPacket] = []
    off = 0
    while off + _NLMSG.size <= len(buf):
        n, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(buf, off)
        if n < _NLMSG.size:
            break
        if mtype == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            prefix, headers = "", None
            for kind, value in _attrs(buf, off + _NLMSG.size + _NFGEN.size, off + n):
                if kind == NFULA_PREFIX:
                    prefix = value.split(b"\0", 1)[0].decode("ascii", "replace")
                elif kind == NFULA_PAYLOAD:
                    headers = parse_ip(value)
            if headers is not None:
                out.append(LoggedPacket(prefix, *headers))
        off += (n + 3) & ~3
    return out


class NflogSocket:
    """One nfnetlink_log listener on `group`.  `read()` blocks up to the socket timeout."""

    def __init__(self, group: int, netns: str | None = None, *, copy_range: int = 96, qthresh: int = 64,
                 flush_cs: int = 10, rcvbuf: int = 1 << 20):
        if not 0 <= group <= 65535:
            raise ValueError(f"NFLOG group {group} is not in 0-65535")
        self.group = group
        self.overruns = 0  # times the kernel dropped messages for a full socket buffer
        self._seq = 0
        if netns:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                with entered(fd):
                    self.sock = self._open(rcvbuf)
            finally:
                os.close(fd)
        else:
            self.sock = self._open(rcvbuf)
        try:
            # Older kernels want each address family bound once per namespace (the flow
            # rules log from iptables and ip6tables alike); newer ones ignore both
            # commands.  Errors from them mean nothing.
            for family in (socket.AF_INET, socket.AF_INET6):
                self._config(family, 0, _attr(NFULA_CFG_CMD, bytes([CMD_PF_UNBIND])), check=False)
                self._config(family, 0, _attr(NFULA_CFG_CMD, bytes([CMD_PF_BIND])), check=False)
            self._config(socket.AF_UNSPEC, group, _attr(NFULA_CFG_CMD, bytes([CMD_BIND])))
            self._config(socket.AF_UNSPEC, group,
                         _attr(NFULA_CFG_MODE, struct.pack("!IBx", copy_range, COPY_PACKET))
                         + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh))
                         + _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", flush_cs)))
        except OSError as e:
            self.sock.close()
            raise NflogUnavailable(f"cannot listen on NFLOG group {group}: {e.strerror or e}") from None

    @staticmethod
    def _open(rcvbuf: int) -> socket.socket:
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except OSError as e:
            raise NflogUnavailable(f"no NETLINK_NETFILTER socket: {e.strerror or e}") from None
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((0, 0))
        return s

    def _config(self, family: int, res_id: int, attrs: bytes, check: bool = True) -> None:
        self._seq += 1
        body = _NFGEN.pack(family, 0, socket.htons(res_id)) + attrs
        mtype = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0) + body)
        self.sock.settimeout(2.0)
        while True:
            buf = self.sock.recv(65536)
            n, mtype, _f, seq, _p = _NLMSG.unpack_from(buf, 0)
            if mtype == NLMSG_ERROR and seq == self._seq:
                code = -struct.unpack_from("=i", buf, _NLMSG.size)[0]
                if code and check:
                    raise OSError(code, os.strerror(code))
                return

    def read(self, timeout: float = 1.0) -> list[LoggedPacket]:
        """The packets of the next batch (empty after `timeout` seconds without one)."""
        self.sock.settimeout(timeout)
        try:
            return parse_messages(self.sock.recv(1 << 17))
        except socket.timeout:
            return []
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self.overruns += 1
                return []
            raise

    def close(self) -> None:
        self.sock.close()
