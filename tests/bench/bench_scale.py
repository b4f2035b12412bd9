"""Scale: a synthetic cluster (tests/bench/scale_cluster.py) synced through tortie's own
datastore code, then the calc, then single changes (prints figures).

    bench_scale.py                 # 10k/500/1k, 50k/2.5k/5k and 100k/5k/10k (minutes)
    bench_scale.py --small         # only 10k pods / 500 nodes / 1k policies
    bench_scale.py --size 50k --datastore etcd --changes 20

Per size and datastore, in a fresh child process (so peak RSS is the agent side's alone):
- etcd: a real etcd on loopback (tests/lab/etcd.py) loaded with every record; the child runs
  EtcdSyncer into a Cluster until in sync (sync), then Dataplane.calculate (first calc:
  chains, ipsets, routes, BIRD config for a bgp pool), then for each change kind (remote pod
  label, remote pod add, local pod add, policy change, node add) 20 times: write the records
  to etcd, wait for the watch to deliver them, apply them, calculate: the time from the write
  to the calc output being ready.
- kubernetes: the stand-in API server (tests/fakes/apiserver.py, in its own process) serving
  the same cluster (pods with status.podIPs, nodes with spec.podCIDRs); KubernetesSyncer with
  its shipped page size; a vxlan default pool with derived VTEPs (what an agent with the
  kubernetes datastore does); changes are upserts on the server (watch events).
The agent's node is node-00000 with 110 pods.  Nothing touches the kernel: the dataplane
object is built in a namespace this script creates and removes, and apply() is never called.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from felix_agent.agent import heap  # noqa: E402
from felix_agent.calc.cluster import Cluster  # noqa: E402
from felix_agent.datastore.convert import to_k8s  # noqa: E402
from felix_agent.model import KIND_OF, SyncStatus, Update  # noqa: E402
from tests.bench.scale_cluster import CHANGE_KINDS, LOCAL_NODE, SIZES, Synthetic  # noqa: E402

K8S_RESOURCE = {"Pod": "pods", "Node": "nodes", "Namespace": "namespaces", "NetworkPolicy": "networkpolicies"}


def up(r) -> Update:
    return Update(KIND_OF[type(r)], r.key, r)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def make_dataplane(netns: str, kubernetes: bool, run_dir: str):
    from felix_agent.dataplane.barrier import Dataplane
    return Dataplane(LOCAL_NODE, "eth0", netns=netns, iptables_backend="nft", run_dir=run_dir,
                     derive_vteps=kubernetes)


class Consumer:
    """What the agent does with syncer events (Agent._handle), minus the kernel."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cluster = Cluster()

    def emit(self, ev) -> None:
        self.queue.put_nowait(ev)

    async def until_in_sync(self) -> None:
        while True:
            ev = await self.queue.get()
            if isinstance(ev, SyncStatus):
                if ev.in_sync:
                    return
                continue
            self.cluster.apply(ev)

    async def until_seen(self, wanted: set[tuple[str, str]]) -> None:
        while wanted:
            ev = await self.queue.get()
            if isinstance(ev, Update):
                self.cluster.apply(ev)
                wanted.discard((ev.kind, ev.key))
        while not self.queue.empty():  # the rest of the batch, as the agent's loop takes it
            ev = self.queue.get_nowait()
            if isinstance(ev, Update):
                self.cluster.apply(ev)


async def child(args) -> dict:
    n_pods, n_nodes, n_pols = SIZES[args.size]
    kube = args.datastore == "kubernetes"
    syn = Synthetic(n_pods, n_nodes, n_pols, pool_mode="vxlan" if kube else "bgp", kubernetes=kube)
    run_dir = tempfile.mkdtemp(prefix="tortie-bench-scale-")
    dp = make_dataplane(args.netns, kube, run_dir)
    con = Consumer()
    server = None
    rss0 = rss_mb()
    t0 = time.perf_counter()
    if kube:
        from felix_agent.datastore.kubernetes import KubernetesSyncer
        server = subprocess.Popen([sys.executable, __file__, "--serve-k8s", "--size", args.size],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        kubeconfig = server.stdout.readline().strip()
        t0 = time.perf_counter()  # the server has loaded the cluster
        syncer = KubernetesSyncer(kubeconfig=kubeconfig)
        con.cluster.apply(up(syn.pool()))  # default_pool from the agent's config
    else:
        from felix_agent.datastore.etcd import EtcdStore, EtcdSyncer
        syncer = EtcdSyncer(EtcdStore.from_endpoint(args.endpoint, args.prefix))
    task = asyncio.create_task(syncer.run(con.emit))
    try:
        try:
            await asyncio.wait_for(con.until_in_sync(), args.sync_timeout)
        except asyncio.TimeoutError:
            raise SystemExit(f"no sync within {args.sync_timeout:.0f} s") from None
        t_sync = time.perf_counter() - t0
        for w in syn.local_weps():  # adopted from the agent's IPAM records at start-up
            con.cluster.apply(up(w))
        gc.collect()
        rss_sync = rss_mb()
        t1 = time.perf_counter()
        plan = dp.calculate(con.cluster)
        t_calc = time.perf_counter() - t1
        heap.settle()  # as the agent does after its first programmed pass in sync
        st = plan.state
        out = {
            "size": args.size, "datastore": args.datastore, "sync_s": t_sync, "first_calc_s": t_calc,
            "rss_sync_mb": rss_sync - rss0, "endpoints": len(con.cluster.endpoints()),
            "ipsets": len(st.ipsets), "members": sum(len(s.members) for s in st.ipsets.values()),
            "rules": sum(len(r) for t in st.chains.values() for r in t.values()),
            "routes": len(st.routes), "bird_conf_kb": len(plan.bird_conf or "") / 1024,
            "changes": {},
        }
        writer = None
        if not kube:
            from felix_agent.datastore.etcd import EtcdStore
            writer = EtcdStore.from_endpoint(args.endpoint, args.prefix)
        for kind in CHANGE_KINDS:
            total, calc = [], []
            for i in range(args.changes):
                recs = syn.change(kind, i)
                wanted = {(KIND_OF[type(r)], r.key) for r in recs}
                if kube:
                    wanted = {w for w in wanted if w[0] != "BlockAffinity"} | {
                        ("BlockAffinity", c) for r in recs if KIND_OF[type(r)] == "Node" for c in r.pod_cidrs}
                t = time.perf_counter()
                if kube:
                    for r in recs:
                        server.stdin.write(json.dumps([K8S_RESOURCE[KIND_OF[type(r)]], to_k8s(r)]) + "\n")
                    server.stdin.flush()
                else:
                    await writer.put_records(recs)
                try:
                    await asyncio.wait_for(con.until_seen(wanted), 120)
                except asyncio.TimeoutError:
                    raise SystemExit(f"{kind} #{i}: no watch event for {sorted(wanted)} in 120 s") from None
                tc = time.perf_counter()
                dp.calculate(con.cluster)
                done = time.perf_counter()
                total.append(done - t)
                calc.append(done - tc)
            out["changes"][kind] = {"p50_ms": pct(total, .5) * 1e3, "p99_ms": pct(total, .99) * 1e3,
                                    "calc_p50_ms": pct(calc, .5) * 1e3}
        if writer is not None:
            await writer.close()
        out["peak_rss_mb"] = peak_rss_mb()
        out["rss0_mb"] = rss0
        return out
    finally:
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)


def serve_k8s(size: str) -> None:
    """The stand-in API server process: load the cluster, print a kubeconfig path, then
    apply '["pods", {...}]' lines from stdin as upserts (watch events); a '"requests"' line
    prints how many list and watch requests it has served (bench_fanout.py)."""
    from tests.fakes.apiserver import FakeAPIServer
    n_pods, n_nodes, n_pols = SIZES[size]
    syn = Synthetic(n_pods, n_nodes, n_pols, pool_mode="vxlan", kubernetes=True)
    api = FakeAPIServer(replay=False)
    for r in syn.records():
        res = K8S_RESOURCE.get(KIND_OF[type(r)])
        if res is not None:
            api.upsert(res, to_k8s(r))
    api.start()
    path = os.path.join(tempfile.mkdtemp(prefix="tortie-bench-kube-"), "kubeconfig")
    print(api.kubeconfig(path), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg == "requests":
            watches = api.count(lambda p, q: q.get("watch") in ("true", "1"))
            print(json.dumps({"watches": watches, "lists": api.count(lambda p, q: True) - watches}), flush=True)
            continue
        res, obj = msg
        api.upsert(res, obj)
    api.stop()


def load_etcd(endpoint: str, prefix: str, size: str) -> float:
    from felix_agent.datastore.etcd import EtcdStore

    async def go():
        n_pods, n_nodes, n_pols = SIZES[size]
        recs = list(Synthetic(n_pods, n_nodes, n_pols).records())
        async with EtcdStore.from_endpoint(endpoint, prefix) as st:
            for i in range(0, len(recs), 2048):
                await st.put_records(recs[i:i + 2048])
        return len(recs)

    return asyncio.run(go())


def report(r: dict) -> None:
    print(f"  {r['size']} {r['datastore']}: sync {r['sync_s']:.1f} s, first calc {r['first_calc_s']:.2f} s, "
          f"sync+calc {r['sync_s'] + r['first_calc_s']:.1f} s; RSS after sync +{r['rss_sync_mb']:.0f} MB, "
          f"peak {r['peak_rss_mb']:.0f} MB (process start {r['rss0_mb']:.0f} MB)")
    print(f"    output: {r['endpoints']} endpoints, {r['ipsets']} ipsets / {r['members']} members, "
          f"{r['rules']} rules, {r['routes']} routes, bird.conf {r['bird_conf_kb']:.1f} KB")
    for kind, c in r["changes"].items():
        print(f"    {kind:17s} write -> calc ready p50 {c['p50_ms']:7.1f} ms  p99 {c['p99_ms']:7.1f} ms"
              f"   (calc alone p50 {c['calc_p50_ms']:.1f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="only the 10k-pod size")
    ap.add_argument("--size", choices=sorted(SIZES), action="append", help="sizes to run (repeatable)")
    ap.add_argument("--datastore", choices=("etcd", "kubernetes", "both"), default="both")
    ap.add_argument("--changes", type=int, default=20, help="changes of each kind to time")
    ap.add_argument("--sync-timeout", type=float, default=600, help="give up a sync after this long (s)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-k8s", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="/tortie", help=argparse.SUPPRESS)
    ap.add_argument("--netns", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_k8s:
        return serve_k8s(args.size[0])
    if args.child:
        args.size = args.size[0]
        print(json.dumps(asyncio.run(child(args))))
        return

    from tests.lab.etcd import Etcd
    from tests.lab.netns import create_namespace, new_prefix, sh

    sizes = ["10k"] if args.small else (args.size or ["10k", "50k", "100k"])
    stores = ("etcd", "kubernetes") if args.datastore == "both" else (args.datastore,)
    ns = f"{new_prefix('tsc')}-bench"
    create_namespace(ns)
    results = []
    try:
        for size in sizes:
            print(f"== {size}: {SIZES[size][0]} pods, {SIZES[size][1]} nodes, {SIZES[size][2]} policies",
                  flush=True)
            for ds in stores:
                argv = [sys.executable, __file__, "--child", "--size", size, "--datastore", ds,
                        "--changes", str(args.changes), "--netns", ns,
                        "--sync-timeout", str(args.sync_timeout)]
                if ds == "etcd":
                    with Etcd() as etcd:
                        t = time.perf_counter()
                        n = load_etcd(etcd.endpoint, "/tortie", size)
                        print(f"  (etcd loaded with {n} keys in {time.perf_counter() - t:.0f} s)", flush=True)
                        p = subprocess.run(argv + ["--endpoint", etcd.endpoint], capture_output=True, text=True)
                else:
                    p = subprocess.run(argv, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"  {size} {ds}: FAILED\n{p.stderr[-3000:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.append(r)
                report(r)
                sys.stdout.flush()
    finally:
        sh("ip", "netns", "del", ns, check=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
