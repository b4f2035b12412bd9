"""podnet.rtnl's message packing and reply handling, against a stand-in socket that
records what is sent and plays back kernel replies (no root; the kernel's own verdict on
these messages is in tests/integration/test_plumbing_rtnl.py)."""
from __future__ import annotations

import errno
import struct

import pytest

from podnet import rtnl
from podnet.rtnl import NetlinkError, Rtnl

HDR = struct.Struct("=IHHII")


class FakeSock:
    """send() records; recv() hands out queued datagrams, built per request seq by `reply`."""

    def __init__(self, reply):
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []
        self.reply = reply

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = HDR.unpack_from(data)[3]
        self.queue.extend(self.reply(seq, data))
        return len(data)

    def recv(self, n: int) -> bytes:
        return self.queue.pop(0)

    def close(self) -> None:
        pass


def msg(mtype: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    n = HDR.size + len(payload)
    return HDR.pack(n, mtype, flags, seq, 0) + payload + b"\0" * (-n % 4)


def ack(seq: int, err: int = 0) -> bytes:
    return msg(rtnl.NLMSG_ERROR, seq, struct.pack("=i", -err) + HDR.pack(16, 0, 0, seq, 0))


def client(reply) -> tuple[Rtnl, FakeSock]:
    nl = Rtnl.__new__(Rtnl)  # no real socket: FakeSock stands in
    sock = FakeSock(reply)
    nl._sock, nl._seq = sock, 0
    return nl, sock


def attrs(buf: bytes) -> list[tuple[int, bytes]]:
    """Every (type, payload) in order, checking lengths and 4-byte alignment."""
    out, off = [], 0
    while off < len(buf):
        n, t = struct.unpack_from("=HH", buf, off)
        assert n >= 4 and off + n <= len(buf)
        out.append((t, buf[off + 4:off + n]))
        off += (n + 3) & ~3
    assert off == len(buf), "trailing bytes or bad padding"
    return out


def link_reply(index: int, name: str, kind: str | None, mac: bytes, group: int = 0, flags: int = 0) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0) + rtnl._attr(rtnl.IFLA_IFNAME, name.encode() + b"\0")
    body += rtnl._attr(rtnl.IFLA_ADDRESS, mac) + rtnl._attr(rtnl.IFLA_GROUP, struct.pack("=I", group))
    if kind:
        # NLA_F_NESTED set, as newer kernels send it: must not hide the attribute.
        body += rtnl._attr(rtnl.IFLA_LINKINFO | 0x8000, rtnl._attr(rtnl.IFLA_INFO_KIND, kind.encode() + b"\0"))
    return body


def test_attributes_are_padded_to_four_bytes():
    assert rtnl._attr(3, b"ab") == struct.pack("=HH", 6, 3) + b"ab\0\0"
    assert rtnl._attr(3, b"abcd") == struct.pack("=HH", 8, 3) + b"abcd"
    assert rtnl._attrs(rtnl._attr(1, b"x") + rtnl._attr(2, b"yyyy")) == {1: b"x", 2: b"yyyy"}


def test_veth_request_layout():
    nl, sock = client(lambda seq, _d: [ack(seq)])
    nl.add_veth("calia", "eth0", 7, 1450, "ee:ee:ee:ee:ee:ee")
    (data,) = sock.sent
    n, mtype, flags, seq, pid = HDR.unpack_from(data)
    assert (n, mtype, pid) == (len(data), rtnl.RTM_NEWLINK, 0)
    # Must ACK (errors surface at the call), CREATE|EXCL (never reuse an existing name).
    assert flags == rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    assert data[16:32] == bytes(16)  # ifinfomsg: AF_UNSPEC, index 0 (the kernel picks)
    top = dict(attrs(data[32:]))
    assert top[rtnl.IFLA_IFNAME] == b"calia\0"
    assert top[rtnl.IFLA_ADDRESS] == b"\xee" * 6
    assert struct.unpack("=I", top[rtnl.IFLA_MTU]) == (1450,)
    info = dict(attrs(top[rtnl.IFLA_LINKINFO]))
    assert info[rtnl.IFLA_INFO_KIND] == b"veth"
    (peer_t, peer), = attrs(info[rtnl.IFLA_INFO_DATA])
    assert peer_t == rtnl.VETH_INFO_PEER and peer[:16] == bytes(16)
    p = dict(attrs(peer[16:]))
    assert p[rtnl.IFLA_IFNAME] == b"eth0\0"
    assert struct.unpack("=I", p[rtnl.IFLA_NET_NS_FD]) == (7,) and struct.unpack("=I", p[rtnl.IFLA_MTU]) == (1450,)


def test_route_and_address_layout():
    nl, sock = client(lambda seq, _d: [ack(seq)])
    nl.add_route("0.0.0.0", 0, 5, gateway="169.254.1.1")
    nl.add_route("10.0.0.1", 32, 5, scope=rtnl.RT_SCOPE_LINK, replace=True)
    nl.add_addr(5, "fd00::1", 128, nodad=True)
    default, host, addr = sock.sent
    assert HDR.unpack_from(default)[2] & (rtnl.NLM_F_EXCL | rtnl.NLM_F_REPLACE) == rtnl.NLM_F_EXCL
    assert struct.unpack_from("=BBBBBBBBI", default, 16) == (2, 0, 0, 0, 254, rtnl.RTPROT_BOOT, 0, 1, 0)
    a = dict(attrs(default[28:]))
    assert rtnl.RTA_DST not in a and a[rtnl.RTA_GATEWAY] == bytes([169, 254, 1, 1])
    assert HDR.unpack_from(host)[2] & rtnl.NLM_F_REPLACE
    assert struct.unpack_from("=BBBBBBBBI", host, 16)[1] == 32 and struct.unpack_from("=B", host, 22) == (253,)
    assert dict(attrs(host[28:]))[rtnl.RTA_DST] == bytes([10, 0, 0, 1])
    assert struct.unpack_from("=BBBBI", addr, 16) == (10, 128, rtnl.IFA_F_NODAD, 0, 5)
    a = dict(attrs(addr[24:]))
    assert a[rtnl.IFA_LOCAL] == a[rtnl.IFA_ADDRESS] == b"\xfd" + bytes(14) + b"\x01"


def test_retire_style_setlink_touches_only_the_up_flag():
    nl, sock = client(lambda seq, _d: [ack(seq)])
    nl.set_link(9, up=False, name="tortd9", group=0x746F7274)
    (data,) = sock.sent
    assert HDR.unpack_from(data)[1] == rtnl.RTM_SETLINK
    assert struct.unpack_from("=BxHiII", data, 16) == (0, 0, 9, 0, rtnl.IFF_UP)  # flags 0, change IFF_UP
    a = dict(attrs(data[32:]))
    assert a[rtnl.IFLA_IFNAME] == b"tortd9\0" and struct.unpack("=I", a[rtnl.IFLA_GROUP]) == (0x746F7274,)


def test_kernel_error_becomes_oserror_with_strerror():
    nl, _ = client(lambda seq, _d: [ack(seq, errno.EEXIST)])
    with pytest.raises(NetlinkError) as e:
        nl.del_link(3)
    assert isinstance(e.value, OSError) and e.value.errno == errno.EEXIST and e.value.strerror == "File exists"


def test_link_lookup_parses_the_reply_and_maps_enodev_to_none():
    mac = bytes.fromhex("0a1b2c3d4e5f")
    nl, _ = client(lambda seq, d: [msg(rtnl.RTM_NEWLINK, seq, link_reply(4, "eth0", "veth", mac, 3, 1)), ack(seq)]
                   if b"eth0" in d else [ack(seq, errno.ENODEV)])
    assert nl.link("eth0") == rtnl.Link(index=4, name="eth0", kind="veth", mac="0a:1b:2c:3d:4e:5f", group=3,
                                        up=True, peer_index=None)
    assert nl.link("nope") is None


def test_dump_spans_datagrams_and_skips_stale_replies():
    def reply(seq, _d):
        stale = msg(rtnl.RTM_NEWLINK, seq - 1, link_reply(99, "old", None, b""))
        first = msg(rtnl.RTM_NEWLINK, seq, link_reply(1, "lo", None, bytes(6)), rtnl.NLM_F_MULTI)
        second = msg(rtnl.RTM_NEWLINK, seq, link_reply(2, "tortd2", "veth", b"\xee" * 6, 0x746F7274),
                     rtnl.NLM_F_MULTI)
        done = msg(rtnl.NLMSG_DONE, seq, struct.pack("=i", 0), rtnl.NLM_F_MULTI)
        return [stale + first, second + done]

    nl, sock = client(reply)
    nl._seq = 5
    links = nl.links()
    assert [(x.index, x.name, x.kind, x.group) for x in links] == [(1, "lo", None, 0), (2, "tortd2", "veth", 0x746F7274)]
    assert HDR.unpack_from(sock.sent[0])[2] & rtnl.NLM_F_DUMP == rtnl.NLM_F_DUMP
