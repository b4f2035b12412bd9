"""CNI ADD latency against a real tortie-agent while it digests bursts of remote pod changes
(root; `make bench`).  Prints ADD p50/p99 quiet and under bursts, and their ratio.

The lab of bench_cni.py (etcd on loopback, a real agent in its own node namespace, pods
bound to its node before their ADD), plus 1,000 pods on another node that three policies
of the agent's pods select as peers (so their labels decide ipset members here).  First N
ADDs (and DELs) run quietly; then N more while this process rewrites the labels of all
1,000 remote pods in etcd, one burst a second (--every; transactions of 128, as fast as
etcd takes them), so ADDs meet the agent decoding and calculating a burst.

    bench_cni_burst.py [--pods N] [--remote 1000] [--every 1.0] [--binary PATH] [--json OUT]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import shutil
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.bench.bench_cni import agent_breakdown, percentile, schedule  # noqa: E402

BENCH_CNI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_cni.py")


def remote_pods(n: int, flip: int):
    from felix_agent.model import Pod
    return [Pod("bench", f"remote-{i}", labels=(("app", ("db", "cache")[(i + flip) % 2]), ("gen", str(flip))),
                node="remote-node", ips=(f"10.70.{i // 250}.{i % 250 + 1}",)) for i in range(n)]


def policies():
    from felix_agent.model import LabelSelector, NetworkPolicy, PolicyPeer, PolicyPort, PolicyRule
    out = []
    for app in ("db", "cache", "web"):
        rule = PolicyRule(peers=(PolicyPeer(pod_selector=LabelSelector((("app", app),))),),
                          ports=(PolicyPort("TCP", 80),))
        out.append(NetworkPolicy("bench", f"from-{app}", LabelSelector(), ingress=(rule,)))
    return out


class Burster(threading.Thread):
    """Rewrites the remote pods' labels in etcd, burst after burst, until stopped."""

    def __init__(self, endpoint: str, n: int, every: float):
        super().__init__(daemon=True)
        self.endpoint, self.n, self.every = endpoint, n, every
        self.stop = threading.Event()
        self.bursts = 0
        self.write_s = 0.0

    def run(self) -> None:
        from felix_agent.datastore.etcd import EtcdStore

        async def go():
            async with EtcdStore.from_endpoint(self.endpoint) as st:
                while not self.stop.is_set():
                    t = time.monotonic()
                    await st.put_records(remote_pods(self.n, self.bursts + 1))
                    self.bursts += 1
                    self.write_s = time.monotonic() - t
                    await asyncio.sleep(max(0.0, self.every - self.write_s))
        asyncio.run(go())


def drive(lab, node, conf: dict, binary: str, pods: list[str], prefix: str) -> dict:
    variants = [{"label": "tortie+agent", "argv": [binary], "conf": conf, "pods": pods,
                 "cid_prefix": prefix, "node_ns": node.ns}]
    p = lab.exec(node.ns, sys.executable, BENCH_CNI, "--driver", input=json.dumps({"variants": variants}),
                 timeout=1800)
    return json.loads(p.stdout)["times"]["tortie+agent"]


def run(args) -> dict:
    from felix_agent.datastore.etcd import EtcdStore
    from tests.lab import Lab, new_prefix, require_tools
    from tests.lab.cluster import LabCluster
    from tests.lab.cnibin import ensure_binary
    from tests.lab.etcd import Etcd

    require_tools(["ip", "etcd", "bird"])
    binary = args.binary or ensure_binary()
    n = args.pods
    tmp = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    try:
        with Etcd() as etcd, Lab(prefix=new_prefix("bb")) as lab:
            lab.build(1)
            node = lab.nodes[0]
            cluster = LabCluster(lab, etcd, str(tmp / "cluster"), cni=[binary])
            cluster.apply_pool("10.65.0.0/16", mode="bgp")

            async def preload():
                async with EtcdStore.from_endpoint(etcd.endpoint) as st:
                    await st.put_records(remote_pods(args.remote, 0) + policies())
            asyncio.run(preload())
            cluster.start_agent(node)
            conf = cluster.cni_conf(node)
            quiet_ns = [lab.add_pod_ns(f"q{i}") for i in range(n)]
            burst_ns = [lab.add_pod_ns(f"b{i}") for i in range(n)]
            # the driver's pods are bench/<cid_prefix>-<i>: bound to the node before their ADD
            schedule(cluster, node, [f"quiet-{i}" for i in range(n)] + [f"busy-{i}" for i in range(n)])
            quiet = drive(lab, node, conf, binary, quiet_ns, "quiet")
            b = Burster(etcd.endpoint, args.remote, args.every)
            b.start()
            while b.bursts < 1:  # the agent is already digesting when the first ADD comes
                time.sleep(0.05)
            t0 = time.monotonic()
            busy = drive(lab, node, conf, binary, burst_ns, "busy")
            took = time.monotonic() - t0
            b.stop.set()
            b.join(timeout=30)
            log = cluster.agent_log(node)

            def steps(prefix: str) -> dict:
                """Where the agent spent an ADD (p50 and p99 per step, ms): which step grows
                under bursts says what blocks it (register = waiting for the pass)."""
                cids = {f"{prefix}-{i}" for i in range(n)}
                p50, p99 = (agent_breakdown(log, cids, stat=lambda v, q=q: percentile(v, q)).get("ADD", {})
                            for q in (50, 99))
                return {k: (p50[k], p99[k]) for k in p50}
            return {"steps": {"quiet": steps("quiet"), "burst": steps("busy")},"pods": n, "remote": args.remote, "bursts": b.bursts, "seconds": took,
                    "changes_per_s": b.bursts * args.remote / max(took, 1e-9),
                    "quiet": {"p50": percentile(quiet["ADD"], 50), "p99": percentile(quiet["ADD"], 99)},
                    "burst": {"p50": percentile(busy["ADD"], 50), "p99": percentile(busy["ADD"], 99)},
                    "load": os.getloadavg()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=60, help="ADDs per phase")
    ap.add_argument("--remote", type=int, default=1000, help="remote pods rewritten per burst")
    ap.add_argument("--every", type=float, default=1.0,
                    help="seconds from one burst's start to the next (0: back to back, a flood)")
    ap.add_argument("--binary", help="the CNI binary (default: dist/tortie, rebuilt if stale)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    r = run(args)
    q, b = r["quiet"], r["burst"]
    print(f"CNI ADD against a real agent, {r['pods']} pods a phase: quiet p50 {q['p50']:.1f} / p99 {q['p99']:.1f} ms; "
          f"during bursts of {r['remote']} remote pod changes ({r['bursts']} bursts, "
          f"{r['changes_per_s']:.0f} changes/s) p50 {b['p50']:.1f} / p99 {b['p99']:.1f} ms; "
          f"p99 ratio {b['p99'] / q['p99']:.2f}x (load {r['load'][0]:.1f})")
    for step, (qp50, qp99) in r["steps"]["quiet"].items():
        bp50, bp99 = r["steps"]["burst"].get(step, (float("nan"),) * 2)
        print(f"  agent step {step:20s} quiet p50 {qp50:6.1f} / p99 {qp99:6.1f} ms   "
              f"bursts p50 {bp50:6.1f} / p99 {bp99:6.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
