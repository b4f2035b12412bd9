"""The kube lab's cluster DNS (tests/kube/cluster_dns.py, the stand-in for CoreDNS): real DNS
messages in and out, over a real UDP socket on loopback; the API server's answer is a dict."""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from tests.kube import cluster_dns as dns

SERVICES = {("default", "web"): "10.96.7.8", ("np", "headless"): "None"}


def lookup(ns: str, name: str) -> str | None:
    return SERVICES.get((ns, name))


def query(name: str, qtype: int = dns.TYPE_A, qid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, dns.CLASS_IN)


def decode(reply: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a response."""
    qid, flags, _qd, an, _ns, _ar = struct.unpack("!HHHHHH", reply[:12])
    pos = reply.index(b"\0", 12) + 5
    addrs = []
    for _ in range(an):
        _ptr, _t, _c, _ttl, rdlen = struct.unpack("!HHHIH", reply[pos:pos + 12])
        addrs.append(socket.inet_ntoa(reply[pos + 12:pos + 12 + rdlen]))
        pos += 12 + rdlen
    return qid, flags & 0xF, addrs


def test_a_service_name_resolves_to_its_cluster_ip():
    r = dns.resolve(dns.parse_query(query("Web.default.svc.cluster.local")), "cluster.local", lookup)
    assert decode(r) == (0x1234, dns.RCODE_OK, ["10.96.7.8"])


@pytest.mark.parametrize("name", ["web.default.svc.cluster.local.default.svc.cluster.local",  # search expansion
                                  "nope.default.svc.cluster.local", "headless.np.svc.cluster.local",
                                  "google.com", "default.svc.cluster.local"])
def test_other_names_are_nxdomain(name):
    assert decode(dns.resolve(dns.parse_query(query(name)), "cluster.local", lookup))[1] == dns.RCODE_NXDOMAIN


def test_aaaa_of_a_service_is_empty_noerror():
    r = dns.resolve(dns.parse_query(query("web.default.svc.cluster.local", dns.TYPE_AAAA)), "cluster.local", lookup)
    assert decode(r) == (0x1234, dns.RCODE_OK, [])


@pytest.mark.parametrize("data", [b"", b"\x12\x34", query("a.b")[:-3], b"\x00\x01\x81\x80" + b"\0" * 8])
def test_malformed_queries_are_refused_clearly(data):
    with pytest.raises(dns.BadQuery):
        dns.parse_query(data)


def test_served_over_udp_and_survives_bad_packets_and_api_errors():
    def flaky(ns, name):
        if name == "boom":
            raise RuntimeError("API server away")
        return lookup(ns, name)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    threading.Thread(target=dns.serve, args=("127.0.0.1", "cluster.local", flaky, port), daemon=True).start()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(5)
    for _ in range(50):  # until the server thread has bound
        c.sendto(query("web.default.svc.cluster.local"), ("127.0.0.1", port))
        try:
            assert decode(c.recv(512))[2] == ["10.96.7.8"]
            break
        except socket.timeout:
            continue
    c.sendto(b"\x99\x98junk", ("127.0.0.1", port))
    assert c.recv(512)[:4] == b"\x99\x98\x80\x01"  # FORMERR, same id
    c.sendto(query("boom.default.svc.cluster.local"), ("127.0.0.1", port))
    assert decode(c.recv(512))[1] == 2  # SERVFAIL
    c.sendto(query("web.default.svc.cluster.local", qid=7), ("127.0.0.1", port))
    assert decode(c.recv(512)) == (7, dns.RCODE_OK, ["10.96.7.8"])
