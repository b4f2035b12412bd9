"""CNI ADD/DEL latency, 100 pods, one node of the netns lab (root; `make bench`).

Compares, each on the same pods one after another:
  tortie        dist/tortie with host-local IPAM, no agent (the binary imports pyroute2)
  tortie+agent  dist/tortie with ipam.type tortie against the fake agent of
                tests/integration/test_cni_agent.py (the design's hot path: stdlib only)
  ptp           Debian's ptp + host-local (the reference)
The timed commands run from a driver process inside the node namespace, so `ip netns
exec` is not part of the figures.  Prints p50/p90/p99 in ms and the ratios to ptp.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cni_plugin.runtime import Attachment, invoke, k8s_args  # noqa: E402

N_PODS = 100
CNI_DIR = "/usr/lib/cni"


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * len(xs) + 0.5) - 1))
    return xs[k]


def drive(spec: dict) -> dict:
    """Inside the node namespace: ADD every pod, then DEL every pod; times in ms."""
    out = {"ADD": [], "DEL": []}
    atts = [Attachment(f"bench-{i}", f"/var/run/netns/{ns}", "eth0", k8s_args("bench", f"pod-{i}"), CNI_DIR)
            for i, ns in enumerate(spec["pods"])]
    for command in ("ADD", "DEL"):
        for att in atts:
            t = time.perf_counter()
            r = invoke(spec["argv"], command, spec["conf"], att)
            out[command].append((time.perf_counter() - t) * 1000)
            if not r.ok:
                raise SystemExit(f"{spec['label']} {command} failed: {r.stdout} {r.stderr}")
    return out


def run_variant(lab, node_ns: str, label: str, argv: list[str], conf: dict, pods: list[str]) -> dict:
    spec = json.dumps({"label": label, "argv": argv, "conf": conf, "pods": pods})
    p = lab.exec(node_ns, sys.executable, os.path.abspath(__file__), "--driver", input=spec, timeout=900)
    return json.loads(p.stdout)


def startup_costs() -> dict:
    """What a plain interpreter, the pyroute2 import and the bundled binary cost to start."""
    def best(argv, stdin=b"", env=None, n=7):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(argv, input=stdin, capture_output=True, env=env)
            ts.append((time.perf_counter() - t) * 1000)
        return statistics.median(ts)
    env = dict(os.environ, CNI_COMMAND="VERSION")
    return {
        "python -c pass": best([sys.executable, "-c", "pass"]),
        "python -c 'from pyroute2 import IPRoute'": best([sys.executable, "-c", "from pyroute2 import IPRoute"]),
        "dist/tortie VERSION": best([os.path.join(ROOT, "dist", "tortie")], b"{}", env),
        "python -m cni_plugin VERSION": best([sys.executable, "-m", "cni_plugin"], b"{}", env),
        "ptp VERSION": best([os.path.join(CNI_DIR, "ptp")], b'{"cniVersion":"1.0.0"}', env),
    }


def main() -> None:
    from tests.integration.test_cni_agent import FakeAgent
    from tests.integration.test_cni_helpers import ensure_binary
    from tests.lab import Lab, new_prefix, require_tools

    require_tools(["ip", "ping"])
    for plugin in ("ptp", "host-local"):
        if not os.access(os.path.join(CNI_DIR, plugin), os.X_OK):
            raise SystemExit(f"bench_cni: {CNI_DIR}/{plugin} missing (apt package containernetworking-plugins)")
    binary = ensure_binary()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cni-"))
    with Lab(prefix=new_prefix("bc")) as lab:
        lab.build(1)
        node = lab.nodes[0]
        pods = [lab.add_pod_ns(f"b{i}") for i in range(N_PODS)]
        agent = FakeAgent(lab, node.ns, tmp)

        def conf(name: str, plugin: str, subnet: str, **extra) -> dict:
            c = {"cniVersion": "1.0.0", "name": name, "type": plugin, "mtu": 1450,
                 "ipam": {"type": "host-local", "dataDir": str(tmp / f"ipam-{name}"),
                          "ranges": [[{"subnet": subnet}]]}}
            if plugin == "tortie":
                c.update(log_file_path=str(tmp / "cni.log"), state_dir=str(tmp / "state"))
            c.update(extra)
            return c

        variants = [
            ("tortie", [binary], conf("k8s-pod-network", "tortie", "10.246.0.0/24")),
            ("tortie+agent", [binary], conf("k8s-pod-network", "tortie", "10.246.1.0/24",
                                            ipam={"type": "tortie"}, agent_socket=agent.socket)),
            ("ptp", [os.path.join(CNI_DIR, "ptp")], conf("bench-ptp", "ptp", "10.246.2.0/24")),
        ]
        print(f"CNI ADD/DEL latency, {N_PODS} pods one after another, one lab node, "
              f"cniVersion 1.0.0, host-local IPAM (ms)")
        stats = {}
        for label, argv, c in variants:
            t = run_variant(lab, node.ns, label, argv, c, pods)
            for cmd in ("ADD", "DEL"):
                xs = t[cmd]
                stats[(label, cmd)] = {p: percentile(xs, p) for p in (50, 90, 99)}
                s = stats[(label, cmd)]
                print(f"  {label:13s} {cmd}: p50 {s[50]:7.1f}  p90 {s[90]:7.1f}  p99 {s[99]:7.1f}")
        print("ratios to ptp (p50):")
        for label in ("tortie", "tortie+agent"):
            for cmd in ("ADD", "DEL"):
                print(f"  {label:13s} {cmd}: {stats[(label, cmd)][50] / stats[('ptp', cmd)][50]:.2f}x")
        ratio = stats[("tortie+agent", "ADD")][50] / stats[("ptp", "ADD")][50]
        print(f"design target ADD p50 (agent path) <= 1.5x ptp: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x)")
        print("startup costs (median of 7, ms; the fake agent's own work is in tortie+agent):")
        for k, v in startup_costs().items():
            print(f"  {k:42s} {v:7.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--driver":
        print(json.dumps(drive(json.loads(sys.stdin.read()))))
    else:
        main()
