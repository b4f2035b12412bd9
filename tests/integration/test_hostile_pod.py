"""A hostile pod on a real two-node lab (etcd, agents with BIRD, pods wired by the real CNI
binary) tries to reach what it must not: the node's loopback services, other pods' traffic,
the agent's local API, other nodes' loopback.  Every attack is real packets from inside
the pod's namespace, which the pod owns (raw sockets; NET_ADMIN where the case says so).

Fixed here (issue 20), each case failing on the code before the fix: route_localnet was 1
on every `cali` veth and nothing dropped pod packets addressed to 127/8, so a hand-made
frame to the gateway MAC with dst 127.0.0.1 got a SYN-ACK from the node's loopback
listener, and an "internet only" egress policy did not stop it (127/8 is inside 0.0.0.0/0).
Now the CNI plumbing writes route_localnet=0, the agent resets it on veths wired before,
and the agent owns a raw PREROUTING guard (`-i cali+ -d 127.0.0.0/8 -j DROP`, and ::1 in
ip6tables) that it repairs like its other chains.

The "internet" is the underlay namespace with an address of its own (INTERNET_IP) that no
pool or node uses; it routes the attacker's address back to node1.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from tests.lab import Etcd, Lab, sh
from tests.lab.cluster import LabCluster, LabPod, wait_for
from tests.lab.prober import anti_spoof_drops
from tests.lab.tools import is_root

pytestmark = pytest.mark.root

POOL = "10.65.0.0/16"
POOL6 = "fd65::/48"  # the pods are dual-stack: the IPv6 cases use their own IPv6 addresses
LOOP_PORT = 7777  # the node's loopback-only "secret" service
INTERNET_IP = "203.0.113.10"
INTERNET_PORT = 8443
RESYNC = 2.0

# A TCP listener bound to loopback that records every peer it accepts and hands it a secret.
LOOPBACK_SERVICE = r"""
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def serve(family, addr, port):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, peer = s.accept()
        log.write("%s %s\n" % (addr, peer[0]))
        try: c.sendall(b"secret\n")
        except OSError: pass
        c.close()
port = int(sys.argv[2])
for fam, addr in ((socket.AF_INET, sys.argv[3]), (socket.AF_INET6, "::1")):
    threading.Thread(target=serve, args=(fam, addr, port), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# Raw frames from inside a pod: TCP SYNs to its gateway MAC, then watch eth0 for any TCP
# answer from the target.  stdlib only.  argv: family src dst dport timeout
RAW_SYN = r"""
import json, os, socket, struct, sys, time
fam, src, dst, dport, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
GW_MAC = bytes.fromhex("eeeeeeeeeeee")
my_mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
af = socket.AF_INET if fam == 4 else socket.AF_INET6
s_ip, d_ip = socket.inet_pton(af, src), socket.inet_pton(af, dst)
def frame(sport):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    if fam == 4:
        pseudo = s_ip + d_ip + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = s_ip + d_ip + struct.pack("!I3xB", len(tcp), 6)
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    if fam == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, s_ip, d_ip)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        return GW_MAC + my_mac + b"\x08\x00" + ip + tcp
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, s_ip, d_ip)
    return GW_MAC + my_mac + b"\x86\xdd" + ip + tcp
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
rx.bind(("eth0", 0)); rx.settimeout(0.1)
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
tx.bind(("eth0", 0))
sports = [40000 + (os.getpid() % 1000) * 10 + i for i in range(3)]
for sp in sports:
    tx.send(frame(sp)); time.sleep(0.05)
answers = []
end = time.monotonic() + timeout
while time.monotonic() < end:
    try:
        data, addr = rx.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    etype = data[12:14]
    if fam == 4 and etype == b"\x08\x00" and data[23] == 6:
        ihl = (data[14] & 15) * 4
        a_src, tcp = data[26:30], data[14 + ihl:]
    elif fam == 6 and etype == b"\x86\xdd" and data[20] == 6:
        a_src, tcp = data[22:38], data[54:]
    else:
        continue
    if a_src == d_ip and struct.unpack("!H", tcp[0:2])[0] == dport:
        answers.append(tcp[13])
print(json.dumps({"sent": len(sports), "answers": answers}))
"""

# The NET_ADMIN trick: the pod routes 127.0.0.1 out of eth0 via its gateway (with
# route_localnet on its own eth0, so its kernel sends to 127/8 on a non-loopback device) and
# connects with an ordinary socket.  argv: pod_ip port timeout
ROUTE_TRICK = r"""
import socket, subprocess, sys
ip, port, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# accept_local: 127.0.0.1 stays an address of the pod's lo, and an answer from a "local"
# source is a martian unless the receiving device accepts them.
for cmd in (["sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1", "net.ipv4.conf.all.route_localnet=1",
             "net.ipv4.conf.eth0.accept_local=1"],
            ["ip", "route", "del", "table", "local", "local", "127.0.0.1", "dev", "lo"],
            ["ip", "route", "del", "table", "local", "local", "127.0.0.0/8", "dev", "lo"],
            ["ip", "route", "add", "127.0.0.0/8", "via", "169.254.1.1", "dev", "eth0", "src", ip]):
    subprocess.run(cmd, check=True)
route = subprocess.run(["ip", "route", "get", "127.0.0.1"], capture_output=True, text=True).stdout.split()
s = socket.socket(); s.settimeout(t)
try:
    s.connect(("127.0.0.1", port)); got = s.recv(16).decode()
except socket.timeout:
    got = "timeout"
except OSError as e:
    got = "error:%s" % e.strerror
print(" ".join(route[:5]) + "|" + got)
"""

# Sniffs eth0 of a pod for TCP to/from `port` while other pods talk; prints the count.
SNIFF = r"""
import socket, struct, sys, time
port, t = int(sys.argv[1]), float(sys.argv[2])
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); rx.bind(("eth0", 0)); rx.settimeout(0.1)
print("ready", flush=True)
n, end = 0, time.monotonic() + t
while time.monotonic() < end:
    try: data, addr = rx.recvfrom(65535)
    except socket.timeout: continue
    if addr[2] != socket.PACKET_OUTGOING and data[12:14] == b"\x08\x00" and data[23] == 6:
        tcp = data[14 + (data[14] & 15) * 4:]
        if port in struct.unpack("!HH", tcp[:4]): n += 1
print(n, flush=True)
"""

# ARP replies from the pod to its gateway MAC and to broadcast, each claiming `ip` is at
# the pod's own MAC.  argv: ip...
ARP_LIES = r"""
import socket, struct, sys, time
me = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); tx.bind(("eth0", 0))
for _ in range(5):
    for claim in sys.argv[1:]:
        ip = socket.inet_aton(claim)
        for dst_mac, dst_ip in ((b"\xee" * 6, socket.inet_aton("169.254.1.1")), (b"\xff" * 6, ip)):
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, me, ip, dst_mac, dst_ip)
            tx.send(dst_mac + me + b"\x08\x06" + arp)
    time.sleep(0.05)
print("sent")
"""


class World:
    def __init__(self, c: LabCluster, a: LabPod, b: LabPod, c2: LabPod, logs: dict[str, str]):
        self.cluster, self.a, self.b, self.c2, self.logs = c, a, b, c2, logs
        self.lab = c.lab
        self.node1, self.node2 = c.lab.node("node1"), c.lab.node("node2")

    def raw_syn(self, pod: LabPod, dst: str, fam: int = 4, src: str | None = None,
                timeout: float = 1.5) -> dict:
        p = sh(sys.executable, "-c", RAW_SYN, str(fam), src or pod.ip, dst, str(LOOP_PORT), str(timeout),
               ns=pod.ns, timeout=timeout + 20)
        return json.loads(p.stdout)

    def guard_drops(self, node_ns: str, fam: int = 4) -> int:
        """Packets counted by the loopback guard of raw cali-PREROUTING; -1 when there is no
        guard (so a test's reachability assertions, made first, say what got through)."""
        tool, dst = ("iptables-save", r"127\.0\.0\.0/8") if fam == 4 else ("ip6tables-save", r"::1(?:/128)?")
        text = sh(tool, "-c", "-t", "raw", ns=node_ns).stdout
        found = re.findall(r"^\[(\d+):\d+\] -A cali-PREROUTING -d " + dst +
                           r" -i cali\+ -m comment --comment \S+ -j DROP$", text, re.M)
        found += re.findall(r"^\[(\d+):\d+\] -A cali-PREROUTING (?:-m comment --comment \S+ )?-i cali\+ -d " + dst +
                            r" -j DROP$", text, re.M)
        assert len(found) <= 1, f"two loopback guards in {tool} raw of {node_ns}:\n{text}"
        return int(found[0]) if found else -1

    def hooked(self, node_ns: str, tool: str = "iptables") -> bool:
        text = sh(f"{tool}-save", "-t", "raw", ns=node_ns).stdout
        return bool(re.search(r"^-A PREROUTING .*-j cali-PREROUTING$", text, re.M))

    def loopback_visitors(self, node: str) -> list[str]:
        """Peers the node's loopback service accepted, other than the node itself (the
        fixture checks the service with a connection of the node's own)."""
        with open(self.logs[node]) as f:
            return [line for line in f.read().splitlines() if line.split()[1] not in ("127.0.0.1", "::1")]


@pytest.fixture(scope="module")
def world(lab_prefix, tmp_path_factory):
    if not is_root():
        pytest.skip("needs root for network namespaces")
    etcd = Etcd()
    lab = Lab(prefix=f"{lab_prefix}-hp")
    try:
        etcd.start()
        lab.build(2)
        work = str(tmp_path_factory.mktemp("hostile"))
        c = LabCluster(lab, etcd, work, resync_interval=RESYNC)
        c.apply_pool(POOL)
        c.apply_pool(POOL6, name="pool6", block_size=122)
        c.start_agents()
        a = c.add_pod("default", "attacker", "node1", labels={"app": "attacker"})
        b = c.add_pod("default", "victim", "node1", labels={"app": "victim"}, serve=["tcp:80"])
        c2 = c.add_pod("default", "far", "node2", labels={"app": "far"}, serve=["tcp:80"])
        logs = {}
        for n in lab.nodes:
            logs[n.name] = os.path.join(work, f"{n.name}-loopback.log")
            proc = lab.popen(n.ns, [sys.executable, "-c", LOOPBACK_SERVICE, logs[n.name], str(LOOP_PORT), "127.0.0.1"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout.readline().strip() == "ready"
        # The internet: an address of the underlay's own, replies to the attacker via node1.
        sh("ip", "addr", "add", f"{INTERNET_IP}/32", "dev", "lo", ns=lab.underlay)
        sh("ip", "link", "set", "lo", "up", ns=lab.underlay)
        sh("ip", "route", "add", f"{a.ip}/32", "via", lab.node("node1").ip, ns=lab.underlay)
        lab.popen(lab.underlay, [sys.executable, "-c", LOOPBACK_SERVICE, os.path.join(work, "internet.log"),
                                 str(INTERNET_PORT), INTERNET_IP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        w = World(c, a, b, c2, logs)
        wait_for(lambda: c.probe(a, c2.ip, 80), timeout=60, what="BGP between the nodes")
        wait_for(lambda: c.probe(a, INTERNET_IP, INTERNET_PORT), what="the internet from the attacker")
        # The node's own loopback service works (the harness is sound).
        assert c.probe(lab.node("node1").ns, "127.0.0.1", LOOP_PORT)
        yield w
    finally:
        lab.teardown()
        etcd.close()


def test_cali_veths_have_route_localnet_off(world: World):
    for pod in (world.a, world.b):
        assert sh("sysctl", "-n", f"net.ipv4.conf.{pod.iface}.route_localnet", ns=world.node1.ns).stdout.strip() == "0"


def test_raw_syn_to_node_loopback_gets_no_answer_and_the_guard_counts_it(world: World):
    """A SYN to 127.0.0.1 in a hand-made frame to the gateway MAC: no SYN-ACK, the node's
    loopback service sees nothing, and the guard's DROP counted the packets."""
    before = world.guard_drops(world.node1.ns)
    got = world.raw_syn(world.a, "127.0.0.1")
    after = world.guard_drops(world.node1.ns)
    assert got["answers"] == [], f"the node's loopback answered the pod: TCP flags {got['answers']}"
    assert before >= 0 and after - before >= got["sent"], f"guard counted {after - before} of {got['sent']} packets"
    # The harness can see answers: the same frames to the node's own address are answered.
    sh("ip", "addr", "add", "10.99.99.1/32", "dev", "lo", ns=world.node1.ns)
    try:
        open_port = world.raw_syn(world.a, "10.99.99.1")  # nothing listens: RST+ACK comes back
        assert open_port["answers"], "the raw prober saw no answer from a reachable node address"
    finally:
        sh("ip", "addr", "del", "10.99.99.1/32", "dev", "lo", ns=world.node1.ns)
    assert world.loopback_visitors("node1") == []
    print(f"loopback guard: {after - before} packets dropped, no answer")


def test_raw_syn_to_node_ipv6_loopback_gets_no_answer(world: World):
    """The same with dst ::1 (from a link-local source).  The kernel itself drops a packet to
    ::1 that arrives on a non-loopback device before netfilter (RFC 4291 2.5.3, counted as
    Ip6InHdrErrors of the interface), so the ip6tables guard, which must exist and be hooked,
    is there for kernels that would not: between them every frame is counted as dropped."""
    def addr_errors() -> int:
        text = sh("cat", f"/proc/net/dev_snmp6/{world.a.iface}", ns=world.node1.ns).stdout
        # ip6_rcv_core counts a loopback address on a non-loopback device as a header error
        return int(re.search(r"^Ip6InHdrErrors\s+(\d+)$", text, re.M).group(1))

    out = sh("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link", ns=world.a.ns).stdout
    link_local = re.search(r"inet6 (fe80::[0-9a-f:]+)/64", out).group(1)
    before, kernel_before = world.guard_drops(world.node1.ns, fam=6), addr_errors()
    got = world.raw_syn(world.a, "::1", fam=6, src=link_local)
    assert got["answers"] == []
    assert before >= 0 and world.hooked(world.node1.ns, "ip6tables")
    drops = world.guard_drops(world.node1.ns, fam=6) - before
    kernel = addr_errors() - kernel_before
    assert drops + kernel >= got["sent"], f"::1 frames: guard counted {drops}, the kernel {kernel}"
    assert world.loopback_visitors("node1") == []
    # The harness can see IPv6 answers: the same frames to the gateway's link-local address
    # (nothing listens there: a RST comes back), from the pod's own IPv6 address (a pod's
    # link-local source passes only the ICMPv6 it needs: anti-spoofing drops the rest).
    assert world.raw_syn(world.a, "fe80::ecee:eeff:feee:eeee", fam=6, src=world.a.ip6)["answers"]
    assert world.raw_syn(world.a, "fe80::ecee:eeff:feee:eeee", fam=6, src=link_local, timeout=0.5)["answers"] == []
    print(f"::1: no answer; the kernel dropped {kernel} (Ip6InHdrErrors), the ip6tables guard {drops}")


def test_net_admin_route_trick_gets_no_answer(world: World):
    """A pod with NET_ADMIN turns on route_localnet on its own eth0 and routes 127/8 via
    169.254.1.1, then connects with an ordinary socket: nothing answers."""
    pod = world.cluster.add_pod("default", "trick", "node1", labels={"app": "trick"})
    try:
        out = sh(sys.executable, "-c", ROUTE_TRICK, pod.ip, str(LOOP_PORT), "2", ns=pod.ns, timeout=30).stdout.strip()
        route, _, result = out.partition("|")
        assert "via 169.254.1.1" in route, f"the trick did not route 127.0.0.1 out of eth0: {route}"
        assert result == "timeout", f"the pod reached the node's loopback: {result}"
        assert world.loopback_visitors("node1") == []
    finally:
        world.cluster.del_pod(pod)


def test_spoofed_ipv4_source_is_dropped(world: World):
    """A SYN from an address the pod does not own (the victim's) to a pod on the other node
    is dropped at the sender's node: the victim never sees a SYN-ACK it did not ask for and
    the far pod answers nothing.  (test_netpol_truth_table covers the policy side.)"""
    got = world.raw_syn(world.a, world.c2.ip, src=world.b.ip)
    assert got["answers"] == []
    own = world.raw_syn(world.a, world.c2.ip)  # the same frames from its own address are answered
    assert own["answers"], "the far pod did not answer the attacker's own address (harness)"


def test_spoofed_ipv6_source_is_dropped(world: World):
    """Hand-made IPv6 SYNs to the victim (same node) from addresses the attacker does not
    own, the victim's own and a free pool address: ip6tables' anti-spoofing DROP counts
    every frame and nothing answers; the same frames from the attacker's own IPv6 address
    are answered (RST: nothing listens on the port)."""
    ns = world.node1.ns
    for spoof in (world.b.ip6, "fd65::ffff:fff0"):
        before = anti_spoof_drops(ns, 6)
        got = world.raw_syn(world.a, world.b.ip6, fam=6, src=spoof, timeout=0.5)
        dropped = anti_spoof_drops(ns, 6) - before
        assert got["answers"] == [] and dropped >= got["sent"], (spoof, got, dropped)
    before = anti_spoof_drops(ns, 6)
    own = world.raw_syn(world.a, world.b.ip6, fam=6, src=world.a.ip6)
    assert own["answers"] and anti_spoof_drops(ns, 6) == before, "the attacker's own IPv6 source must pass"


def test_arp_lies_do_not_divert_other_pods_traffic(world: World):
    """The attacker claims the victim's address and the gateway's in ARP replies (to the
    gateway MAC and broadcast).  Traffic to the victim from the node, the other node's pod
    and the far pod still reaches the victim, and none of it reaches the attacker."""
    c = world.cluster
    sniff = world.lab.popen(world.a.ns, [sys.executable, "-c", SNIFF, "80", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert sniff.stdout.readline().strip() == "ready"
    sh(sys.executable, "-c", ARP_LIES, world.b.ip, "169.254.1.1", world.c2.ip, ns=world.a.ns)
    assert c.probe(world.node1.ns, world.b.ip, 80)
    assert c.probe(world.c2, world.b.ip, 80)
    assert c.probe(world.b, world.c2.ip, 80)
    seen = int(sniff.stdout.readline().strip())
    sniff.wait(timeout=10)
    assert seen == 0, f"the attacker saw {seen} packets of other pods' port-80 traffic"
    neigh = sh("ip", "neigh", "show", world.b.ip, ns=world.node1.ns).stdout
    mac = sh("cat", f"/sys/class/net/eth0/address", ns=world.b.ns).stdout.strip()
    assert all(f"dev {world.b.iface} " in line and mac in line for line in neigh.splitlines() if "lladdr" in line
               and f"dev {world.a.iface} " not in line), neigh


def test_other_nodes_loopback_is_out_of_reach(world: World):
    """node2 serves on its 127.0.0.1 only: the attacker on node1 gets no connection to it
    through node2's address (refused: nothing listens there), and 127/8 frames never leave
    node1 (the guard drops them); node2's service sees nobody."""
    assert not world.cluster.probe(world.a, world.node2.ip, LOOP_PORT)
    before = world.guard_drops(world.node1.ns)
    assert world.raw_syn(world.a, "127.0.0.1")["answers"] == []
    assert world.loopback_visitors("node2") == []
    assert before >= 0 and world.guard_drops(world.node1.ns) > before


def test_agent_socket_is_root_only_and_refuses_an_unprivileged_pod_process(world: World):
    """The CNI socket is a file in the node's filesystem with mode 0600, owned by root.  A
    real pod has its own mount namespace without it; the lab's pods share the host's mount
    namespace, so what the lab can show is the permission check: a non-root process in the
    pod's network namespace cannot connect."""
    path = world.cluster.socket_path("node1")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n print(e.strerror)\n")
    out = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code, path,
             ns=world.a.ns).stdout.strip()
    assert out == "Permission denied", out


INTERNET_ONLY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "internet-only", "namespace": "default"},
    "spec": {"podSelector": {"matchLabels": {"app": "attacker"}}, "policyTypes": ["Egress"],
             "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0",
                                             "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}]}]},
}


def test_internet_only_egress_policy_still_keeps_loopback_closed(world: World):
    """ipBlock 0.0.0.0/0 except the private ranges contains 127/8: the policy alone would
    let the frame to 127.0.0.1 through to the node; the guard does not."""
    c = world.cluster
    c.apply(INTERNET_ONLY)
    try:
        wait_for(lambda: not c.probe(world.a, world.c2.ip, 80, timeout=0.5), what="the egress policy")
        assert c.probe(world.a, INTERNET_IP, INTERNET_PORT)  # the internet passes
        before = world.guard_drops(world.node1.ns)
        assert world.raw_syn(world.a, "127.0.0.1")["answers"] == []
        assert before >= 0 and world.guard_drops(world.node1.ns) > before
    finally:
        c.delete("networkpolicy", "internet-only", "default")
    wait_for(lambda: c.probe(world.a, world.c2.ip, 80, timeout=0.5), what="the policy gone")


def test_guard_survives_resync_and_is_put_back_after_a_flush(world: World):
    """A resync keeps the guard (its counter keeps counting: not rewritten); flushing the
    chain and deleting the hook by hand (IPv4 and IPv6) are repaired by the next resync."""
    ns = world.node1.ns
    before = world.guard_drops(ns)
    assert before > 0  # the earlier cases' drops
    time.sleep(RESYNC * 2)  # at least one full resync pass
    assert world.guard_drops(ns) >= before
    sh("iptables", "-t", "raw", "-F", "cali-PREROUTING", ns=ns)
    sh("iptables", "-t", "raw", "-D", "PREROUTING", "-j", "cali-PREROUTING", ns=ns, check=False)
    text = sh("iptables-save", "-t", "raw", ns=ns).stdout
    hook = re.search(r"^-A PREROUTING (.*-j cali-PREROUTING)$", text, re.M)
    if hook:
        sh("iptables", "-t", "raw", "-D", "PREROUTING", *hook.group(1).replace('"', "").split(), ns=ns)
    sh("ip6tables", "-t", "raw", "-F", "cali-PREROUTING", ns=ns)
    assert not world.hooked(ns)
    wait_for(lambda: world.hooked(ns) and "127.0.0.0/8" in sh("iptables-save", "-t", "raw", ns=ns).stdout
             and "::1" in sh("ip6tables-save", "-t", "raw", ns=ns).stdout, timeout=RESYNC * 5, what="the guard repaired")
    assert world.raw_syn(world.a, "127.0.0.1")["answers"] == []
    assert world.guard_drops(ns) > 0


def test_agent_turns_route_localnet_off_on_veths_wired_before(world: World):
    """A node upgraded from a version that set route_localnet=1: the agent's next full pass
    resets it on existing cali veths."""
    key = f"net.ipv4.conf.{world.b.iface}.route_localnet"
    sh("sysctl", "-qw", f"{key}=1", ns=world.node1.ns)
    wait_for(lambda: sh("sysctl", "-n", key, ns=world.node1.ns).stdout.strip() == "0", timeout=RESYNC * 5,
             what="route_localnet reset by the agent")
    assert "route_localnet was on for pod interfaces" in world.cluster.agent_log("node1")

