"""CNI ADD/DEL latency on one node of the netns lab (root; `make bench`).

Variants, each with its own pod namespaces, run INTERLEAVED (pod i of every variant, then
pod i+1 ...), so that load from other work on the machine falls on all of them alike:
  ptp           Debian's ptp + host-local (the reference)
  tortie        dist/tortie + host-local, no agent (the binary imports pyroute2 and wires)
  tortie+fake   dist/tortie (ipam tortie) against the fake agent of
                tests/integration/test_cni_agent.py (it execs host-local and wires)
  tortie+agent  dist/tortie (ipam tortie) against the REAL tortie-agent of
                tests/lab/cluster.py (etcd, IPAM with fsync, plumbing, endpoint
                registration that waits for a dataplane pass, BIRD)
The real agent has a lab node of its own (node2), so that it sees only its own pods'
veths and routes, as on a real node with that many pods; the other variants share node1.
Its pods are bound to node2 in etcd before the first ADD (as the scheduler binds a pod
before kubelet asks for its sandbox), so the agent has programmed their chains already and
an ADD adds addresses to ipsets only; --unscheduled skips that, for the slower path of a
pod the agent has never seen.
The timed commands run from one driver process (it enters node2's namespace with setns
for the agent's variant), so `ip netns exec` is not part of the figures.  Prints p50/p90/p99 in ms, the ratios to ptp, and where
the time of the real-agent ADD goes: the binary's own timestamps (debug lines in cni.log),
the agent's per-step timings (its "CNI ADD" log lines) and the dataplane pass per driver
(the agent's /metrics).

    bench_cni.py [--pods N] [--binary PATH] [--floor] [--json OUT] [--compare BEFORE.json]

--floor also builds an empty program with deploy/build-cni.sh's options and times it:
the start-up every PyInstaller binary pays, whatever it does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from podnet import nsutil
from tests.lab.cni_runtime import Attachment, k8s_args  # noqa: E402

CNI_DIR = "/usr/lib/cni"
COMMANDS = ("ADD", "DEL")
LABELS = ("ptp", "tortie", "tortie+fake", "tortie+agent")


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * len(xs) + 0.5) - 1))
    return xs[k]


def summary(xs: list[float]) -> dict:
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99), "n": len(xs)}


# --- the driver: runs inside the node namespace --------------------------------------------

def _run_plugin(argv: list[str], command: str, conf: bytes, att: Attachment) -> tuple[float, float, str]:
    """(start, end) on CLOCK_MONOTONIC, which every process on the machine shares, so the
    binary's own timestamps can be placed on the same axis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update({"CNI_COMMAND": command, "CNI_PATH": CNI_DIR, "CNI_CONTAINERID": att.container_id,
                "CNI_IFNAME": att.ifname, "CNI_NETNS": att.netns, "CNI_ARGS": att.cni_args})
    t0 = time.monotonic()
    p = subprocess.run(argv, input=conf, capture_output=True, env=env)
    t1 = time.monotonic()
    if p.returncode != 0:
        raise SystemExit(f"{argv[0]} {command} {att.container_id} failed: {p.stdout!r} {p.stderr!r}")
    return t0, t1, p.stdout.decode()


def drive(spec: dict) -> dict:
    """ADD pod i of every variant in turn, for every i; then DEL the same way."""
    variants = spec["variants"]
    out = {v["label"]: {c: [] for c in COMMANDS} for v in variants}
    stamps = {v["label"]: {} for v in variants}  # container id -> [spawn, exit] per command
    n = len(variants[0]["pods"])
    nsfds = {v["node_ns"]: os.open(f"/var/run/netns/{v['node_ns']}", os.O_RDONLY) for v in variants}
    for command in COMMANDS:
        for i in range(n):
            for v in variants:
                cid = f"{v['cid_prefix']}-{i}"
                att = Attachment(cid, f"/var/run/netns/{v['pods'][i]}", "eth0",
                                 k8s_args("bench", f"{v['cid_prefix']}-{i}"), CNI_DIR)
                # The child is forked from this thread, so it starts in the node's namespace.
                with nsutil.entered(nsfds[v["node_ns"]]):
                    t0, t1, _ = _run_plugin(v["argv"], command, json.dumps(v["conf"]).encode(), att)
                out[v["label"]][command].append((t1 - t0) * 1000)
                stamps[v["label"]].setdefault(cid, {})[command] = [t0, t1]
    for fd in nsfds.values():
        os.close(fd)
    return {"times": out, "stamps": stamps}


def schedule(cluster, node, pods: list[str]) -> None:
    """Bind the real agent's pods to its node before any ADD, as the scheduler does before
    kubelet asks for a sandbox, and wait until the agent has programmed their chains (it
    does so before their ADD: felix_agent/calc/filter.py)."""
    from podnet.naming import host_iface_name
    from tests.lab.cluster import wait_for
    from tests.lab.prober import census

    cluster.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": p, "namespace": "bench"},
                    "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "none"}]}}
                   for p in pods])
    last = host_iface_name("bench", pods[-1])
    wait_for(lambda: f":cali-tw-{last}" in census(node.ns).text, timeout=60,
             what="the agent to program the scheduled pods")


# --- start-up costs -----------------------------------------------------------------------

def build_floor(tmp: Path) -> str:
    """An empty script bundled exactly like the CNI binary (dist/tortie-floor)."""
    empty = tmp / "empty.py"
    empty.write_text("pass\n")
    subprocess.run(["bash", os.path.join(ROOT, "deploy", "build-cni.sh"), "--entry", str(empty),
                    "--name", "tortie-floor"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return os.path.join(ROOT, "dist", "tortie-floor", "tortie-floor")


def startup_costs(binary: str, floor: str | None = None, n: int = 15) -> dict:
    """Median wall and CPU (user+sys) time of processes that do next to nothing, run in
    turn n times: the binary answering VERSION, ptp answering VERSION, a bare interpreter
    (and, with --floor, an empty PyInstaller program)."""
    import resource
    env = dict(os.environ, CNI_COMMAND="VERSION")
    cmds = {
        "dist/tortie VERSION": [binary],
        "ptp VERSION": [os.path.join(CNI_DIR, "ptp")],
        "python3 -S -I -c pass": [sys.executable, "-S", "-I", "-c", "pass"],
    }
    if floor:
        cmds["empty PyInstaller program"] = [floor]
    wall: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(n):
        for k, argv in cmds.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run(argv, input=b'{"cniVersion":"1.0.0"}', capture_output=True, env=env)
            wall[k].append((time.perf_counter() - t) * 1000)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[k].append((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1000)
    return {k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in cmds}


# --- breakdown of the real-agent ADD -------------------------------------------------------

# debug line of the binary: "... timing ADD <cid>/<if> entry=<t> main=<t> sent=<t> reply=<t> done=<t>"
_BIN_TIMING = re.compile(r"timing (ADD|DEL) (\S+)/\S+ ((?:\w+=[\d.]+ ?)+)")
# the agent: "CNI ADD <cid>/<if>: ok in 0.012s" optionally followed by "(alloc=.. plumb=.. ...)" in ms
_AGENT_LINE = re.compile(r"CNI (ADD|DEL) (\S+)/\S+: ok in ([\d.]+)s(?: \(([^)]*)\))?")


def binary_breakdown(log_path: str, stamps: dict) -> dict:
    """Per command: median ms of spawn->entry (bootloader + interpreter start), entry->main
    (imports), main->sent (config, netns, connect), sent->reply (the agent), reply->done
    (result out), done->exit (interpreter exit, reaped by the driver)."""
    phases: dict[str, dict[str, list[float]]] = {c: {} for c in COMMANDS}
    try:
        text = open(log_path).read()
    except OSError:
        return {}
    for m in _BIN_TIMING.finditer(text):
        command, cid = m.group(1), m.group(2)
        t = {k: float(v) for k, v in (kv.split("=") for kv in m.group(3).split())}
        span = stamps.get(cid, {}).get(command)
        if span is None or not {"entry", "main", "sent", "reply", "done"} <= t.keys():
            continue
        points = [("start-up (bootloader, interpreter)", span[0], t["entry"]),
                  ("imports", t["entry"], t["main"]),
                  ("config, netns, connect, send", t["main"], t["sent"]),
                  ("agent (socket round trip)", t["sent"], t["reply"]),
                  ("result out", t["reply"], t["done"]),
                  ("exit and reap", t["done"], span[1])]
        for name, a, b in points:
            phases[command].setdefault(name, []).append((b - a) * 1000)
    return {c: {k: statistics.median(v) for k, v in ph.items()} for c, ph in phases.items() if ph}


def agent_breakdown(log_text: str, cids: set[str], stat=statistics.median) -> dict:
    """Per command: the agent's own total and, when it logs them, its steps (median ms, or
    `stat` of the samples)."""
    out: dict[str, dict[str, list[float]]] = {c: {} for c in COMMANDS}
    for m in _AGENT_LINE.finditer(log_text):
        command, cid, total, steps = m.group(1), m.group(2), float(m.group(3)), m.group(4)
        if cid not in cids:
            continue
        out[command].setdefault("total in the agent", []).append(total * 1000)
        for kv in (steps or "").split():
            k, _, v = kv.partition("=")
            try:
                out[command].setdefault(k, []).append(float(v.rstrip("ms")))
            except ValueError:
                pass
    return {c: {k: stat(v) for k, v in d.items()} for c, d in out.items() if d}


def metrics_apply(text: str) -> dict[str, tuple[float, float]]:
    """driver -> (sum seconds, count) of tortie_dataplane_apply_seconds."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = re.match(r'tortie_dataplane_apply_seconds_(sum|count)\{driver="([^"]+)"\} ([\d.e+-]+)', line)
        if m:
            out.setdefault(m.group(2), [0.0, 0.0])[0 if m.group(1) == "sum" else 1] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def pass_breakdown(before: dict, after: dict) -> dict:
    """Mean ms per dataplane pass and driver over the run (a pass covers every driver)."""
    out = {}
    for driver, (s1, c1) in after.items():
        s0, c0 = before.get(driver, (0.0, 0.0))
        if c1 > c0:
            out[driver] = {"mean_ms": (s1 - s0) / (c1 - c0) * 1000, "passes": int(c1 - c0)}
    return out


# --- the run --------------------------------------------------------------------------------

def run(args) -> dict:
    from tests.lab import require_tools
    from tests.lab.cnibin import ensure_binary

    require_tools(["ip", "ping", "etcd", "bird"])
    for plugin in ("ptp", "host-local"):
        if not os.access(os.path.join(CNI_DIR, plugin), os.X_OK):
            raise SystemExit(f"bench_cni: {CNI_DIR}/{plugin} missing (apt package containernetworking-plugins)")
    binary = args.binary or ensure_binary()
    n = args.pods
    tmp = Path(tempfile.mkdtemp(prefix="bench-cni-"))
    try:
        return _run(args, binary, n, tmp)
    finally:
        if args.keep:
            print(f"bench_cni: logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, binary: str, n: int, tmp: Path) -> dict:
    from tests.integration.test_cni_agent import FakeAgent
    from tests.lab import Lab, new_prefix
    from tests.lab.cluster import LabCluster
    from tests.lab.etcd import Etcd

    floor = build_floor(tmp) if args.floor else None
    with Etcd() as etcd, Lab(prefix=new_prefix("bc")) as lab:
        lab.build(2)
        node, agent_node = lab.nodes
        cluster = LabCluster(lab, etcd, str(tmp / "cluster"), cni=[binary])
        cluster.apply_pool("10.65.0.0/16", mode="bgp")
        cluster.start_agent(agent_node)
        fake = FakeAgent(lab, node.ns, tmp) if "tortie+fake" in args.variants else None

        def hl_conf(name: str, plugin: str, subnet: str) -> dict:
            c = {"cniVersion": "1.0.0", "name": name, "type": plugin, "mtu": 1450,
                 "ipam": {"type": "host-local", "dataDir": str(tmp / f"ipam-{name}"),
                          "ranges": [[{"subnet": subnet}]]}}
            if plugin == "tortie":
                c.update(log_file_path=str(tmp / "cni.log"), log_level="debug", state_dir=str(tmp / "state"))
            return c

        agent_conf = cluster.cni_conf(agent_node)
        agent_log = os.path.join(cluster.node_dir(agent_node), "cni.log")
        confs = {
            "ptp": ([os.path.join(CNI_DIR, "ptp")], hl_conf("bench-ptp", "ptp", "10.246.2.0/24")),
            "tortie": ([binary], hl_conf("bench-tortie", "tortie", "10.246.0.0/24")),
            "tortie+fake": ([binary], dict(hl_conf("bench-fake", "tortie", "10.246.1.0/24"),
                                           ipam={"type": "tortie"}, agent_socket=fake.socket if fake else "")),
            "tortie+agent": ([binary], agent_conf),
        }
        variants = []
        for label in LABELS:
            if label not in args.variants:
                continue
            prefix = label.replace("+", "-")
            pods = [lab.add_pod_ns(f"{prefix[:8]}{i}") for i in range(n)]
            argv, conf = confs[label]
            variants.append({"label": label, "argv": argv, "conf": conf, "pods": pods, "cid_prefix": prefix,
                             "node_ns": agent_node.ns if label == "tortie+agent" else node.ns})

        if "tortie+agent" in args.variants and not args.unscheduled:
            schedule(cluster, agent_node, [f"tortie-agent-{i}" for i in range(n)])
        metrics0 = metrics_apply(cluster.http(agent_node, "/metrics")[1])
        p = lab.exec(node.ns, sys.executable, os.path.abspath(__file__), "--driver",
                     input=json.dumps({"variants": variants}), timeout=1800)
        driven = json.loads(p.stdout)
        metrics1 = metrics_apply(cluster.http(agent_node, "/metrics")[1])

        result: dict = {"pods": n, "binary": os.path.realpath(binary), "load": os.getloadavg(),
                        "stats": {}, "breakdown": {}}
        for label, times in driven["times"].items():
            result["stats"][label] = {c: summary(times[c]) for c in COMMANDS}
        if "tortie+agent" in driven["stamps"]:
            stamps = driven["stamps"]["tortie+agent"]
            result["breakdown"] = {
                "binary": binary_breakdown(agent_log, stamps),
                "agent": agent_breakdown(cluster.agent_log(agent_node), set(stamps)),
                "dataplane_pass": pass_breakdown(metrics0, metrics1),
            }
        result["startup"] = startup_costs(binary, floor)
    return result


# --- output ---------------------------------------------------------------------------------

def report(res: dict, before: dict | None = None) -> None:
    n = res["pods"]
    print(f"CNI ADD/DEL latency (ms), {n} pods per variant, variants interleaved, one lab node, "
          f"cniVersion 1.0.0; load average {res['load'][0]:.1f}")
    stats = res["stats"]
    runs = [("before", before["stats"]), ("after", stats)] if before else [("", stats)]
    head = f"  {'variant':13s} {'cmd':4s}" + "".join(
        f" {(tag + ' ') if tag else ''}{'p50':>6s} {'p90':>6s} {'p99':>6s} {'x ptp':>6s} |" for tag, _ in runs)
    print(head)
    for label in LABELS:
        for cmd in COMMANDS:
            if label not in stats:
                continue
            row = f"  {label:13s} {cmd:4s}"
            for tag, st in runs:
                s = st.get(label, {}).get(cmd)
                ref = st.get("ptp", {}).get(cmd)
                if s is None:
                    row += " " * (len(tag) + 1 if tag else 0) + f" {'-':>6s} {'-':>6s} {'-':>6s} {'-':>6s} |"
                    continue
                ratio = s["p50"] / ref["p50"] if ref else float("nan")
                row += (" " * (len(tag) + 1) if tag else "") + \
                    f" {s['p50']:6.1f} {s['p90']:6.1f} {s['p99']:6.1f} {ratio:5.2f}x |"
            print(row)
    if "tortie+agent" in stats and "ptp" in stats:
        add = stats["tortie+agent"]["ADD"]["p50"] / stats["ptp"]["ADD"]["p50"]
        dl = stats["tortie+agent"]["DEL"]["p50"] / stats["ptp"]["DEL"]["p50"]
        print(f"targets (real agent): ADD p50 <= 1.5x ptp: {'met' if add <= 1.5 else 'NOT met'} ({add:.2f}x); "
              f"DEL p50 <= 1.0x ptp: {'met' if dl <= 1.0 else 'NOT met'} ({dl:.2f}x)")
    bd = res.get("breakdown") or {}
    for cmd in COMMANDS:
        b = bd.get("binary", {}).get(cmd)
        if b:
            print(f"tortie+agent {cmd}, where the time goes (median ms, binary's clock):")
            for k, v in b.items():
                print(f"  {k:40s} {v:7.1f}")
        a = bd.get("agent", {}).get(cmd)
        if a:
            print(f"  inside the agent ({cmd}, median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in a.items()))
    dp = bd.get("dataplane_pass")
    if dp:
        print("  dataplane pass, mean ms per driver over the run: " +
              ", ".join(f"{k} {v['mean_ms']:.1f}" for k, v in sorted(dp.items())) +
              f" ({max(v['passes'] for v in dp.values())} passes)")
    print("start-up costs (median of 15; wall ms / CPU ms):")
    for k, v in res["startup"].items():
        extra = ""
        if before and k in before.get("startup", {}):
            b = before["startup"][k]
            extra = f"   (before {b['wall']:6.1f} / {b['cpu']:6.1f})"
        print(f"  {k:28s} {v['wall']:6.1f} / {v['cpu']:6.1f}{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--binary", help="the CNI binary to measure (default: dist/tortie, rebuilt if stale)")
    ap.add_argument("--variants", default=",".join(LABELS), help="comma-separated subset of " + ", ".join(LABELS))
    ap.add_argument("--floor", action="store_true", help="also time an empty PyInstaller program")
    ap.add_argument("--unscheduled", action="store_true",
                    help="do not create the real agent's Pod objects first: each ADD then meets a pod the "
                         "agent has never seen and programs its chains itself")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (agent and CNI logs)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--compare", help="a --json file of an earlier run: print before/after side by side")
    ap.add_argument("--report-only", action="store_true", help="print --json's figures (with --compare) and exit")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    before = json.load(open(args.compare)) if args.compare else None
    if args.report_only:
        report(json.load(open(args.json)), before)
        return
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    report(res, before)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        print(json.dumps(drive(json.loads(sys.stdin.read()))))
    else:
        main()
