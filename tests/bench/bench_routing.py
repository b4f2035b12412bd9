"""Routing between nodes: figures from whole lab clusters (real etcd, agents, BIRD, pods
wired by the real CNI binary).  A plain script (`make bench` runs it, root); it prints
figures and asserts nothing about speed.

  throughput   pod-to-pod TCP (iperf3) across two nodes in bgp, direct and vxlan mode,
               next to a node-to-node baseline over the raw veth underlay measured in the
               same lab just before, printed as ratios to it; for IPv4 and IPv6 (a
               dual-stack lab: the IPv6 pod row next to the raw IPv6 veth baseline).
  convergence  a node joins a cluster of N nodes (N = 3 and 10, the joiner included):
               time from starting its agent to every other node having a route to its
               block (the block is claimed in etcd beforehand, so pod creation is not
               part of the figure), in bgp and vxlan mode.

    .venv/bin/python tests/bench/bench_routing.py [--seconds 3] [--sizes 3,10] [--skip-throughput]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TORTIE_PYTHON", sys.executable)  # the lab's nsproxy helper

from pyroute2 import IPRoute  # noqa: E402

from felix_agent.datastore.etcd import EtcdStore  # noqa: E402
from felix_agent.model import BlockAffinity  # noqa: E402
from tests.lab import Etcd, Lab, new_prefix, require_tools, sh  # noqa: E402
from tests.lab.cluster import LabCluster, wait_for  # noqa: E402

POOL = "10.65.0.0/16"
POOL6 = "fd00:10:65::/112"
IPERF_PORT = 5201


# -- throughput -----------------------------------------------------------------------------

def iperf(lab: Lab, server_ns: str, client_ns: str, server_ip: str, seconds: float) -> float:
    """Gbit/s received by an iperf3 server in server_ns from a client in client_ns."""
    srv = lab.popen(server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: sh("ss", "-Hltn", f"sport = :{IPERF_PORT}", ns=server_ns).stdout.strip(), timeout=10,
             what="iperf3 server listening")
    out = sh("iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", ns=client_ns,
             timeout=seconds + 30).stdout
    srv.wait(timeout=10)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def throughput(mode: str, seconds: float, workdir: str, rounds: int = 2) -> dict[int, tuple[float, float]]:
    """IP version -> (baseline Gbit/s node1 -> node2 over the underlay, pod -> pod Gbit/s
    in `mode`), in one dual-stack lab: the best of `rounds` runs each, interleaved, so a
    burst of load from other work on the machine hits both sides alike."""
    with Etcd() as etcd, Lab(prefix=new_prefix("br")) as lab:
        lab.build(2, ipv6=True)
        n1, n2 = lab.nodes
        c = LabCluster(lab, etcd, os.path.join(workdir, f"tp-{mode}"))
        c.apply_pool(POOL, mode=mode)
        c.apply_pool(POOL6, mode=mode, name="pool6")
        c.start_agents()
        a = c.add_pod("default", "client", "node1")
        b = c.add_pod("default", "server", "node2")
        out = {}
        for version, node_ip, pod_ip in ((4, n2.ip, b.ip), (6, n2.ip6, b.ip6)):
            wait_for(lambda: c.ping(a, pod_ip), timeout=30, what=f"{mode}: pod to pod over IPv{version}")
            base = pod = 0.0
            for _ in range(rounds):
                base = max(base, iperf(lab, n2.ns, n1.ns, node_ip, seconds))
                pod = max(pod, iperf(lab, b.ns, a.ns, pod_ip, seconds))
            out[version] = (base, pod)
        for n in lab.nodes:
            c.stop_agent(n)
        return out


# -- convergence ---------------------------------------------------------------------------

def claim(etcd: Etcd, cidr: str, node: str) -> None:
    async def put():
        async with EtcdStore.from_endpoint(etcd.endpoint) as store:
            await store.put_record(BlockAffinity(cidr=cidr, node=node, pool="pool"))
    asyncio.run(put())


def has_route(ipr: IPRoute, net: ipaddress.IPv4Network) -> bool:
    for r in ipr.route("dump"):
        if r.get("table") == 254 and r["dst_len"] == net.prefixlen and r.get("dst") == str(net.network_address):
            return True
    return False


def convergence(mode: str, n_nodes: int, workdir: str) -> tuple[float, float, float]:
    """(seconds until the first other node has the route, until every one has it,
    seconds the joiner's agent took to become ready), for a node joining n_nodes - 1."""
    with Etcd() as etcd, Lab(prefix=new_prefix("bv")) as lab:
        lab.build(n_nodes - 1)
        c = LabCluster(lab, etcd, os.path.join(workdir, f"cv-{mode}-{n_nodes}"))
        c.apply_pool(POOL, mode=mode)
        c.start_agents()
        # Every existing node holds a block, so BIRD sessions and VTEPs are all up.
        for n in lab.nodes:
            c.add_pod("default", f"p-{n.name}", n.name)
        if mode == "bgp":
            wait_for(lambda: all(sum(1 for p in c.status(n)["bgp_peers"] if p["info"].startswith("Established"))
                                 == n_nodes - 2 for n in lab.nodes), timeout=120, what="mesh established")
        new = lab.add_node()
        block = ipaddress.ip_network("10.65.250.0/26")
        claim(etcd, str(block), new.name)
        iprs = [IPRoute(netns=n.ns, flags=0) for n in lab.nodes if n is not new]
        try:
            seen: dict[int, float] = {}
            t0 = time.monotonic()
            c.start_agent(new, wait=False)
            ready_at, next_ready_check = None, 0.0
            while len(seen) < len(iprs) and time.monotonic() - t0 < 120:
                for i, ipr in enumerate(iprs):
                    if i not in seen and has_route(ipr, block):
                        seen[i] = time.monotonic() - t0
                # /readyz costs a process start: ask twice a second, not every round
                if ready_at is None and time.monotonic() >= next_ready_check:
                    next_ready_check = time.monotonic() + 0.5
                    if c.http(new, "/readyz")[0] == 200:
                        ready_at = time.monotonic() - t0
                time.sleep(0.01)
            if len(seen) < len(iprs):
                raise SystemExit(f"{mode}/{n_nodes}: only {len(seen)} of {len(iprs)} nodes got the route in 120s")
            if ready_at is None:
                c.wait_ready(new)
                ready_at = time.monotonic() - t0
        finally:
            for ipr in iprs:
                ipr.close()
        for n in lab.nodes:
            c.stop_agent(n)
        return min(seen.values()), max(seen.values()), ready_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 run length")
    ap.add_argument("--sizes", default="3,10", help="cluster sizes for the convergence figure")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    require_tools(["ip", "ping", "iperf3", "etcd", "bird", "birdc", "ss"])
    workdir = tempfile.mkdtemp(prefix="bench-routing-")
    try:
        if not args.skip_throughput:
            print(f"pod-to-pod TCP throughput across two nodes (iperf3, one stream, best of 2 runs of "
                  f"{args.seconds:g}s; baseline: node to node over the same veth underlay, same lab, "
                  "interleaved):")
            for mode in ("bgp", "direct", "vxlan"):
                for version, (base, pod) in throughput(mode, args.seconds, workdir).items():
                    print(f"  {mode:7s} IPv{version} pod->pod {pod:6.2f} Gbit/s   baseline {base:6.2f} Gbit/s   "
                          f"ratio {pod / base:5.2f}")
        print("route convergence after a node joins (agent start -> a route to its block on the other "
              "nodes; seconds):")
        for n in [int(x) for x in args.sizes.split(",") if x]:
            for mode in ("bgp", "vxlan"):
                first, last, ready = convergence(mode, n, workdir)
                print(f"  {n:2d} nodes {mode:6s} first node {first:5.2f}   every node {last:5.2f}   "
                      f"(joiner ready after {ready:5.2f})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
