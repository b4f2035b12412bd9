"""The agent's flow table (agent/flows.py) and the nfnetlink_log message parser
(dataplane/nflog.py), without the kernel: packets are built as the kernel sends them."""
from __future__ import annotations

import socket
import struct

from felix_agent.agent.flows import FlowLog, FlowTable, canonical
from felix_agent.calc.desired import FlowRule
from felix_agent.dataplane.nflog import (
    NFULA_PAYLOAD,
    NFULA_PREFIX,
    LoggedPacket,
    NflogUnavailable,
    parse_messages,
)
from tortiectl.flows import decided_by

DENY = FlowRule("deny", "ingress", "Admin", "ClusterNetworkPolicy/no-y", 1, "block-y")


def ipv4_udp(src: str, dst: str, dport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return ip + struct.pack("!HHHH", 40000, dport, 8, 0)


def attr(kind: int, value: bytes) -> bytes:
    n = 4 + len(value)
    return struct.pack("=HH", n, kind) + value + b"\0" * (-n % 4)


def packet_msg(prefix: str, payload: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(20)) + attr(NFULA_PREFIX, prefix.encode() + b"\0") \
        + attr(NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), 4 << 8, 0, 0, 0) + body


def test_parse_messages_reads_prefix_addresses_and_port_of_each_packet():
    buf = packet_msg("D:abc", ipv4_udp("10.0.0.2", "10.0.0.3", 53)) + packet_msg("A:def", ipv4_udp("1.2.3.4", "5.6.7.8", 80))
    assert parse_messages(buf) == [LoggedPacket("D:abc", "10.0.0.2", "10.0.0.3", "udp", 53),
                                   LoggedPacket("A:def", "1.2.3.4", "5.6.7.8", "udp", 80)]
    assert parse_messages(b"\x01\x02") == []  # a short read is nothing, not an error


def ipv6(src: str, dst: str, next_header: int, rest: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(rest), next_header, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + rest


def test_parse_messages_reads_ipv6_packets_through_their_extension_headers():
    tcp = struct.pack("!HHIIHHHH", 40000, 8080, 0, 0, 0x5002, 0, 0, 0)
    hop_by_hop = struct.pack("!BB6x", 6, 0)  # next: TCP; 8 octets
    dst_opts = struct.pack("!BB14x", 17, 1)  # next: UDP; 16 octets
    first_fragment = struct.pack("!BBHI", 17, 0, 0x0001, 7)  # offset 0, more fragments
    later_fragment = struct.pack("!BBHI", 17, 0, 0x0100, 7)  # offset 32: no UDP header here
    buf = (packet_msg("D:a6", ipv6("fd00::2", "fd00:0:0::3", 6, tcp))
           + packet_msg("D:b6", ipv6("fd00::2", "fd00::3", 0, hop_by_hop + tcp))
           + packet_msg("A:c6", ipv6("fd00::2", "fd00::3", 60, dst_opts + struct.pack("!HHHH", 5000, 53, 8, 0)))
           + packet_msg("A:d6", ipv6("fd00::2", "fd00::3", 44, first_fragment + struct.pack("!HHHH", 5000, 53, 8, 0)))
           + packet_msg("A:e6", ipv6("fd00::2", "fd00::3", 44, later_fragment + b"\0" * 8))
           + packet_msg("D:f6", ipv6("fd00::2", "fd00::3", 58, struct.pack("!BBHHH", 128, 0, 0, 1, 1)))
           + packet_msg("D:g6", ipv6("fd00::2", "fd00::3", 0, b"\x06\x00"))  # cut inside the extension header
           + packet_msg("D:v4", ipv4_udp("10.0.0.2", "10.0.0.3", 53)))
    assert parse_messages(buf) == [LoggedPacket("D:a6", "fd00::2", "fd00::3", "tcp", 8080),
                                   LoggedPacket("D:b6", "fd00::2", "fd00::3", "tcp", 8080),
                                   LoggedPacket("A:c6", "fd00::2", "fd00::3", "udp", 53),
                                   LoggedPacket("A:d6", "fd00::2", "fd00::3", "udp", 53),
                                   LoggedPacket("A:e6", "fd00::2", "fd00::3", "udp", 0),
                                   LoggedPacket("D:f6", "fd00::2", "fd00::3", "icmpv6", 0),
                                   LoggedPacket("D:g6", "fd00::2", "fd00::3", "0", 0),
                                   LoggedPacket("D:v4", "10.0.0.2", "10.0.0.3", "udp", 53)]
    assert parse_messages(packet_msg("D:x", ipv6("fd00::2", "fd00::3", 6, b"")[:39])) == []  # short: nothing


def test_ipv6_addresses_are_named_whatever_their_spelling():
    assert canonical("fd00:0:0:0::5") == "fd00::5" and canonical("10.0.0.5") == "10.0.0.5"
    assert canonical("not-an-ip") == "not-an-ip"


def test_packets_aggregate_into_flows_with_the_rule_that_decided():
    t = FlowTable(10)
    pkt = LoggedPacket("D:r1", "10.0.0.2", "10.0.0.3", "tcp", 80)
    counts = t.add([pkt, pkt, LoggedPacket("D:zz", "10.0.0.2", "10.0.0.3", "tcp", 80)], {"r1": DENY}, 100.0)
    assert counts[("deny", "Admin", "ClusterNetworkPolicy/no-y")] == 2
    assert counts[("deny", "unknown", "zz")] == 1
    flows = {f.rule_id: f for f in t.flows()}
    assert flows["r1"].packets == 2 and flows["r1"].rule == DENY and flows["zz"].rule is None
    t.add([LoggedPacket("D:zz", "10.0.0.2", "10.0.0.3", "tcp", 80)], {"zz": DENY}, 101.0)
    assert {f.rule_id: f for f in t.flows()}["zz"].rule == DENY  # named once the calc knows the id


def test_the_table_holds_at_most_max_flows_evicting_the_least_recently_seen():
    t = FlowTable(3)
    for port in range(1, 6):
        t.add([LoggedPacket("D:r1", "10.0.0.2", "10.0.0.3", "udp", port)], {}, float(port))
    assert len(t) == 3 and t.evicted == 2
    assert [f.dport for f in t.flows()] == [3, 4, 5]
    seq = t.seq
    t.add([LoggedPacket("D:r1", "10.0.0.2", "10.0.0.3", "udp", 3)], {}, 9.0)
    assert [f.dport for f in t.flows(since=seq)] == [3]  # --follow: only what changed


def test_an_unavailable_group_is_reported_not_raised():
    def refuse(group, netns):
        raise NflogUnavailable(f"cannot listen on NFLOG group {group}: Device or resource busy")
    fl = FlowLog(20, 100, opener=refuse)
    fl.start()
    assert fl.status()["state"] == "unavailable" and "busy" in fl.status()["reason"]
    assert fl.document()["flows"] == []


def test_decided_by_names_tier_policy_and_rule():
    assert decided_by({"tier": "Admin", "policy": "ClusterNetworkPolicy/no-y", "rule": 1,
                       "rule_name": "block-y", "verdict": "deny"}) == "Admin: ClusterNetworkPolicy/no-y rule 1 (block-y)"
    assert decided_by({"tier": "NetworkPolicy", "policy": "NetworkPolicy x/a", "rule": -1,
                       "verdict": "deny"}) == "NetworkPolicy x/a (no rule allowed)"


def test_the_flows_route_says_off_and_refuses_a_bad_cursor():
    from felix_agent.agent.health import _flows_body
    code, _, body = _flows_body(None, "")
    assert code == 200 and b'"state": "off"' in body
    fl = FlowLog(20, 10, opener=lambda group, netns: None)  # never started: nothing read
    assert _flows_body(fl.document, "since=x")[0] == 400
    code, _, body = _flows_body(fl.document, "denied=1&namespace=x&since=0")
    assert code == 200 and b'"flows": []' in body


def test_status_shows_the_flow_log_state():
    from tortiectl.status import render_status
    st = {"node": "n1", "datastore": "etcd", "in_sync": True,
          "flow_logs": {"state": "unavailable", "reason": "cannot listen on NFLOG group 20: busy"}}
    assert "Flow logs:        unavailable (cannot listen on NFLOG group 20: busy)" in render_status(st)
    st["flow_logs"] = {"state": "on", "nflog_group": 20, "flows": 3, "max_flows": 10, "evicted": 1}
    assert "Flow logs:        on (NFLOG group 20, 3/10 flows, 1 evicted)" in render_status(st)


def test_tortiectl_flows_follow_prints_flows_as_they_come_and_stops_on_interrupt():
    """Against a real /flows server on loopback (health.serve) fed with packets."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from felix_agent.agent.health import Health, serve

    fl = FlowLog(20, 100, opener=lambda group, netns: None)
    fl.state = "on"
    rules = {"r1": DENY}
    srv = serve(Health(), "127.0.0.1", 0, flows=fl.document)
    try:
        fl.table.add([LoggedPacket("D:r1", "10.0.0.2", "10.0.0.3", "tcp", 80)], rules, time.time())
        p = subprocess.Popen([sys.executable, "-m", "tortiectl.cli", "flows", "--follow", "--agent",
                              f"http://127.0.0.1:{srv.server_address[1]}"], stdout=subprocess.PIPE, text=True,
                                 # a run started in the background (sh's `&`) ignores SIGINT, and
                                 # the child would inherit that: ^C is what is under test
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        killer = threading.Timer(20, p.kill)  # a hung read must not hang the suite
        killer.start()
        first = p.stdout.readline() + p.stdout.readline()  # the header and the first flow
        threading.Timer(0.2, fl.table.add, ([LoggedPacket("D:r1", "10.0.0.2", "10.0.0.3", "udp", 53)],
                                            rules, time.time())).start()
        later = p.stdout.readline()  # printed by the follow loop
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 130
        killer.cancel()
    finally:
        srv.shutdown()
    assert "80/tcp" in first and "Admin: ClusterNetworkPolicy/no-y rule 1 (block-y)" in first
    assert "53/udp" in later and "DENY" in later
