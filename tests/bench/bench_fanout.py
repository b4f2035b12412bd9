"""The fan-out at scale: many agents' datastore side against one API server, watching it
directly or through one tortie-fanout (prints figures).

    bench_fanout.py                           # 10k pods / 500 nodes / 1k policies, 100 agents
    bench_fanout.py --agents 200 --size 10k --mode fanout

Per mode, fresh processes:
- the stand-in API server (tests/fakes/apiserver.py via bench_scale.py --serve-k8s) serving
  the synthetic cluster of tests/bench/scale_cluster.py; it counts the list and watch
  requests it serves;
- fanout: a real tortie-fanout (tests/lab/fanout.py), timed to its first in-sync;
- the agents: their datastore stage only (FanoutSyncer, or KubernetesSyncer for "direct",
  each feeding its own model), `--per-process` of them per process; all are started
  at the same moment and each records the time from its start to its SyncStatus(True)
  (start-up: connect, snapshot or lists, in sync). Then 10 pod label changes, each timed
  from the write to the stand-in until every agent has it (wall clock, one machine).
The calc and dataplane after the datastore stage are the same in both modes (bench_scale.py
measures them). Figures depend on the machine's load: run both modes in one go.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from felix_agent.datastore.convert import to_k8s  # noqa: E402
from felix_agent.model import SyncStatus, Update  # noqa: E402
from tests.bench.bench_policy import cpu_seconds, vm_mb  # noqa: E402
from tests.bench.bench_scale import pct, rss_mb  # noqa: E402
from tests.bench.scale_cluster import SIZES, Synthetic  # noqa: E402

BENCH_SCALE = os.path.join(REPO, "tests", "bench", "bench_scale.py")
CHANGED_POD = 7  # a remote pod of the synthetic cluster, relabelled by the changes


# --- the agents' side (a child process) -------------------------------------------------

async def agents_child(args) -> None:
    """`args.n` agents in this process; stdin: "go", then change lines '<key> <n>'."""
    from felix_agent.datastore.base import Backoff

    if args.fanout:
        from felix_agent.datastore.fanout.client import FanoutSyncer
        host, _, port = args.fanout.rpartition(":")
        syncers = [FanoutSyncer([(host, int(port))], f"node-{args.first + i:05d}") for i in range(args.n)]
    else:
        from felix_agent.datastore.kubernetes import KubernetesSyncer
        syncers = [KubernetesSyncer(kubeconfig=args.kubeconfig, backoff=Backoff(0.5, 5)) for _ in range(args.n)]
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline().strip()))
    print("ready", flush=True)
    assert await lines.get() == "go"
    t0 = time.perf_counter()
    cpu0 = os.times().user + os.times().system
    synced: list[float | None] = [None] * args.n
    all_synced = asyncio.Event()
    watch: dict = {"key": None, "want": None, "seen": {}}
    changed = asyncio.Event()

    def emitter(i: int):
        def emit(ev) -> None:
            if isinstance(ev, SyncStatus):
                if ev.in_sync and synced[i] is None:
                    synced[i] = time.perf_counter() - t0
                    if all(s is not None for s in synced):
                        all_synced.set()
            elif isinstance(ev, Update) and ev.key == watch["key"] and ev.value is not None \
                    and dict(ev.value.labels).get("version") == watch["want"] and i not in watch["seen"]:
                watch["seen"][i] = time.time()
                if len(watch["seen"]) == args.n:
                    changed.set()
        return emit

    tasks = [asyncio.create_task(s.run(emitter(i))) for i, s in enumerate(syncers)]
    await all_synced.wait()
    cpu = os.times()
    print(json.dumps({"startup_s": synced, "rss_mb": rss_mb(), "cpu_s": cpu.user + cpu.system - cpu0}), flush=True)
    while True:
        line = await lines.get()
        if not line:
            break
        key, want = line.split()
        watch.update(key=key, want=want, seen={})
        changed.clear()
        print("armed", flush=True)
        await changed.wait()
        print(json.dumps({"arrived": list(watch["seen"].values())}), flush=True)
    for t in tasks:
        t.cancel()


# --- the parent --------------------------------------------------------------------------

def run_mode(mode: str, size: str, n_agents: int, per_process: int, log_dir: str) -> dict:
    from tests.lab.fanout import Fanout

    api = subprocess.Popen([sys.executable, BENCH_SCALE, "--serve-k8s", "--size", size],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    kubeconfig = api.stdout.readline().strip()

    def requests() -> dict:
        api.stdin.write('"requests"\n')
        api.stdin.flush()
        return json.loads(api.stdout.readline())

    fanout = None
    hosts: list[subprocess.Popen] = []
    out: dict = {"mode": mode, "size": size, "agents": n_agents}
    try:
        target = ["--kubeconfig", kubeconfig]
        if mode == "fanout":
            fanout = Fanout(kubeconfig, os.path.join(log_dir, "fanout.log"))
            t = time.perf_counter()
            fanout.start()
            while fanout.metrics().get("tortie_fanout_in_sync") != 1:
                time.sleep(0.1)
            out["fanout_sync_s"] = time.perf_counter() - t
            target = ["--fanout", f"127.0.0.1:{fanout.port}"]
        for first in range(0, n_agents, per_process):
            n = min(per_process, n_agents - first)
            hosts.append(subprocess.Popen([sys.executable, __file__, "--agents-child", "--n", str(n),
                                           "--first", str(first), *target],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for h in hosts:
            assert h.stdout.readline().strip() == "ready"
        serving = [p.pid for p in (fanout.proc if fanout else None, api) if p is not None]
        serving_cpu0 = sum(cpu_seconds(pid)[0] for pid in serving)
        for h in hosts:
            h.stdin.write("go\n")
            h.stdin.flush()
        startup, rss, cpu = [], [], 0.0
        for h in hosts:
            r = json.loads(h.stdout.readline())
            startup += r["startup_s"]
            rss.append(r["rss_mb"] / len(r["startup_s"]))
            cpu += r["cpu_s"]
        out["agent_cpu_s"] = cpu / n_agents  # an agent's own start-up, on a node of its own
        out["serving_cpu_s"] = sum(cpu_seconds(pid)[0] for pid in serving) - serving_cpu0  # API (+ fan-out)
        time.sleep(1.0)  # the direct syncers' watches follow their lists
        out.update(requests())
        out["startup_p50_s"], out["startup_p99_s"] = pct(startup, .5), pct(startup, .99)
        out["startup_max_s"] = max(startup)
        out["agent_rss_mb"] = sum(rss) / len(rss)  # per agent (its process's RSS / agents in it)
        if fanout is not None:
            out["fanout_rss_mb"] = vm_mb(fanout.proc.pid)  # its peak
        syn = Synthetic(*SIZES[size], pool_mode="vxlan", kubernetes=True)
        pod = syn.pod(CHANGED_POD)
        lat = []
        for i in range(10):
            want = f"bench{i}"
            for h in hosts:
                h.stdin.write(f"{pod.key} {want}\n")
                h.stdin.flush()
            for h in hosts:
                assert h.stdout.readline().strip() == "armed"
            obj = to_k8s(pod)
            obj["metadata"]["labels"]["version"] = want
            t = time.time()
            api.stdin.write(json.dumps(["pods", obj]) + "\n")
            api.stdin.flush()
            arrived = []
            for h in hosts:
                arrived += json.loads(h.stdout.readline())["arrived"]
            lat.append(max(arrived) - t)
        out["change_all_p50_ms"] = pct(lat, .5) * 1e3
        out["change_all_max_ms"] = max(lat) * 1e3
        return out
    finally:
        for h in hosts:
            try:
                h.stdin.close()
                h.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                h.kill()
        if fanout is not None:
            fanout.kill()
        api.stdin.close()
        api.wait(timeout=60)


def report(r: dict) -> None:
    extra = (f"; fan-out: in sync {r['fanout_sync_s']:.1f} s, peak RSS {r['fanout_rss_mb']:.0f} MB"
             if r["mode"] == "fanout" else "")
    print(f"  {r['mode']:6s} {r['agents']} agents: API watches {r['watches']}, lists {r['lists']}; "
          f"start-up p50 {r['startup_p50_s']:.1f} s p99 {r['startup_p99_s']:.1f} s (max {r['startup_max_s']:.1f}); "
          f"CPU an agent {r['agent_cpu_s']:.2f} s, API+fan-out {r['serving_cpu_s']:.1f} s; "
          f"~{r['agent_rss_mb']:.0f} MB an agent; one change to all agents p50 {r['change_all_p50_ms']:.0f} ms "
          f"max {r['change_all_max_ms']:.0f} ms{extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="10k")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--per-process", type=int, default=25, help="agents in one process")
    ap.add_argument("--mode", choices=("fanout", "direct", "both"), default="both")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--agents-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--fanout", help=argparse.SUPPRESS)
    ap.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agents_child:
        asyncio.run(agents_child(args))
        return
    n_pods, n_nodes, n_pols = SIZES[args.size]
    print(f"== {args.size}: {n_pods} pods, {n_nodes} nodes, {n_pols} policies; {args.agents} agents "
          f"({args.per_process} a process)", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="tortie-bench-fanout-") as log_dir:
        for mode in (("fanout", "direct") if args.mode == "both" else (args.mode,)):
            r = run_mode(mode, args.size, args.agents, args.per_process, log_dir)
            results.append(r)
            report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
