"""What a flood of denied packets costs an agent with flow logs on, against one with them
off, side by side in one run.

A plain script (`make bench` runs it; root).  One lab node per setting: real etcd,
tortie-agent, a server pod isolated by a default-deny NetworkPolicy and a client pod on
the same node.  For each phase (10 s each by default) the client floods the server with
UDP from a tight loop, the agent's CPU time (its own, from /proc/<pid>/stat) and memory
(VmRSS, VmHWM) are read before and after, with the packets sent and, with flow logs on,
what the agent saw (logged packets, flows, evictions, overruns):

  idle        no traffic: the reader thread's own cost
  one-flow    one destination port: every packet the same flow
  many-flows  a new destination port each packet (3000 rotating): the flow table fills

and, with flow logs on, how soon a denied packet shows in /flows: 20 single packets to new
ports, each timed from its send to the first /flows answer that lists it (polled every 5 ms
from this process, which enters the pod's and the node's namespaces for the two sockets).

    .venv/bin/python tests/bench/bench_flowlog.py [--seconds 10] [--max-flows 500]

Three agents in turn: flow logs off; on with the default rates (100 denied packets a
second per rule, 10 per flow); on with the deny rate at its maximum, 10,000 per rule and
1,000 per flow (what the rate limit saves).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from podnet.nsutil import entered, netns_path  # noqa: E402
from tests.bench.bench_policy import cpu_seconds, pct, vm_mb  # noqa: E402
from tests.lab.cluster import AGENT_HTTP_PORT  # noqa: E402
from tests.lab import Etcd, Lab, new_prefix, sh  # noqa: E402
from tests.lab.cluster import LabCluster, wait_for  # noqa: E402

FLOOD = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ip, secs, many = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "many"
end, port, sent = time.monotonic() + secs, 2000, 0
while time.monotonic() < end:
    for _ in range(200):
        s.sendto(b"x", (ip, port))
        if many:
            port = 2000 + (port - 1999) % 3000
    sent += 200
print(sent)
"""
DENY_ALL = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "probe"},
            "spec": {"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"]}}


def logged_packets(c: LabCluster) -> float:
    code, body = c.http("node1", "/metrics")
    return sum(float(m.group(1)) for m in re.finditer(r"^tortie_flow_logged_packets_total\{[^}]*\} (\S+)$",
                                                       body, re.M))


def visible_seconds(c: LabCluster, client_ns: str, server_ip: str, n: int = 20) -> list[float]:
    """Send -> listed in /flows, for `n` single denied UDP packets to ports no flow has yet."""
    client_fd = os.open(netns_path(client_ns), os.O_RDONLY | os.O_CLOEXEC)
    node_fd = os.open(netns_path(c.lab.node("node1").ns), os.O_RDONLY | os.O_CLOEXEC)
    url = f"http://127.0.0.1:{AGENT_HTTP_PORT}/flows?denied=1"
    out = []
    try:
        with entered(client_fd):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(n):
            port = 6000 + i
            t0 = time.monotonic()
            sock.sendto(b"x", (server_ip, port))
            while time.monotonic() - t0 < 10:
                with entered(node_fd):  # the HTTP client's socket is made in the node
                    flows = json.load(urllib.request.urlopen(url, timeout=5))["flows"]
                if any(f["dport"] == port for f in flows):
                    out.append(time.monotonic() - t0)
                    break
                time.sleep(0.005)
            time.sleep(0.2)
        sock.close()
    finally:
        os.close(client_fd)
        os.close(node_fd)
    return out


def run(flow_logs: bool, seconds: float, max_flows: int, deny_rate: int = 100) -> list[dict]:
    out = []
    args = ("--flow-logs", "true", "--flow-log-max-flows", str(max_flows),
            "--flow-log-deny-rate", str(deny_rate)) if flow_logs else ()
    label = f"on, deny rate {deny_rate:5d}/s" if flow_logs else "off" + " " * 21
    with tempfile.TemporaryDirectory(prefix="tortie-bench-flowlog-") as work, Etcd() as etcd, \
            Lab(prefix=new_prefix("bf")) as lab:
        lab.build(1)
        c = LabCluster(lab, etcd, work, agent_args=args)
        c.apply_pool("10.65.0.0/16")
        c.apply_namespace("probe")
        c.start_agents()
        pid = c.agents["node1"].pid
        server = c.add_pod("probe", "server", "node1", labels={"pod": "server"}, serve=["udp:81"])
        client = c.add_pod("probe", "client", "node1", labels={"pod": "client"})
        c.apply(DENY_ALL)
        wait_for(lambda: not c.probe(client, server.ip, 81, proto="udp", timeout=0.3), what="the deny")
        time.sleep(1)
        if flow_logs:
            lat = visible_seconds(c, client.ns, server.ip)
            print(f"flow logs {label} a denied packet listed in /flows after p50 {statistics.median(lat) * 1000:.0f} ms, "
                  f"p99 {pct(lat, 0.99) * 1000:.0f} ms ({len(lat)} of 20 seen within 10 s)", flush=True)
            out.append({"flow_logs": True, "deny_rate": deny_rate, "phase": "visible",
                        "p50_ms": round(statistics.median(lat) * 1000), "p99_ms": round(pct(lat, 0.99) * 1000),
                        "seen": len(lat)})
        for phase in ("idle", "one-flow", "many-flows"):
            cpu0, rss0, logged0 = cpu_seconds(pid)[0], vm_mb(pid, "VmRSS"), logged_packets(c) if flow_logs else 0
            t0 = time.monotonic()
            if phase == "idle":
                time.sleep(seconds)
                sent = 0
            else:
                p = sh(sys.executable, "-c", FLOOD, server.ip, str(seconds), "many" if phase == "many-flows" else "one",
                       ns=client.ns, timeout=seconds + 30)
                sent = int(p.stdout.strip() or 0)
            time.sleep(1)  # the reader's last batch
            took = time.monotonic() - t0
            fl = c.status("node1").get("flow_logs") or {}
            out.append({"flow_logs": flow_logs, "deny_rate": deny_rate, "phase": phase, "seconds": round(took, 1), "sent": sent,
                        "agent_cpu_s": round(cpu_seconds(pid)[0] - cpu0, 2),
                        "rss_mb": (round(rss0, 1), round(vm_mb(pid, "VmRSS"), 1)), "hwm_mb": round(vm_mb(pid), 1),
                        "logged": int(logged_packets(c) - logged0) if flow_logs else 0,
                        "flows": fl.get("flows", 0), "evicted": fl.get("evicted", 0),
                        "overruns": fl.get("overruns", 0)})
            r = out[-1]
            print(f"flow logs {label} {phase:10s} {r['sent'] / took:9.0f} pkt/s sent; "
                  f"agent CPU {r['agent_cpu_s']:.2f} s in {took:.1f} s; RSS {r['rss_mb'][0]} -> {r['rss_mb'][1]} MB "
                  f"(HWM {r['hwm_mb']} MB); logged {r['logged']}, flows {r['flows']}, evicted {r['evicted']}, "
                  f"overruns {r['overruns']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-flows", type=int, default=500)
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args()
    # off; on with the default rates; on with the rate limit at its maximum (what the
    # limit saves: the reader then sees ~10,000 packets a second per rule)
    results = run(False, a.seconds, a.max_flows) + run(True, a.seconds, a.max_flows) + \
        run(True, a.seconds, a.max_flows, deny_rate=10000)
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
