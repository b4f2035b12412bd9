"""`make demo` as a user runs it: deploy/demo.py up prints the reachability matrix before
and after the policies, every command it then suggests works as printed, and `make
demo-down` leaves nothing behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.lab import list_namespaces, sh
from tests.lab.cnibin import ROOT, ensure_binary

pytestmark = pytest.mark.root

DEMO = os.path.join(ROOT, "deploy", "demo.py")
STATE_FILE = "/run/tortie-demo/state.json"
PODS = ["frontend/web", "frontend/client", "backend/db", "backend/cache"]


def allowed(src: str, dst: str) -> bool:
    """What the demo's policies mean: ingress to backend is denied by default, except
    frontend/web -> backend/db on TCP 80; a pod reaching itself never leaves its netns."""
    if src == dst or not dst.startswith("backend/"):
        return True
    return (src, dst) == ("frontend/web", "backend/db")


def matrix_after(out: str, title: str) -> dict[tuple[str, str], str]:
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if title in ln)
    header = lines[i + 1].split()
    assert header == PODS, lines[i + 1]
    cells = {}
    for row in lines[i + 2:i + 2 + len(PODS)]:
        src, *vals = row.split()
        assert len(vals) == len(PODS), row
        cells.update({(src, dst): v for dst, v in zip(PODS, vals)})
    return cells


def proc_identity(pid: int) -> str | None:
    """pid + start time of a live process, so a recycled pid is not mistaken for a
    survivor; None when gone (a killed process waiting to be reaped by init is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else f"{pid}:{fields[19]}"


def hints(out: str) -> list[str]:
    """The commands the demo tells its user to try, as printed (comments dropped)."""
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith("The cluster is running"))
    cmds = []
    for ln in lines[i + 1:]:
        if not ln.startswith("  "):
            break
        cmds.append(ln.split("  #")[0].strip())
    return cmds


def run_hint(cmd: str) -> subprocess.CompletedProcess:
    """One hint as a user pastes it into a root shell in the repository (pipes included);
    the pod shell hint gets a command on stdin and ends at EOF."""
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, input="ip -o -4 addr show dev eth0\n",
                          capture_output=True, text=True, timeout=120)


def check_hint(cmd: str, p: subprocess.CompletedProcess, pods: dict) -> str:
    """Assert what the hint shows; returns which kind of hint it was."""
    out = p.stdout
    assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])
    node1 = {k for k, v in pods.items() if v["node"] == "node1"}
    if " ping " in cmd:
        assert " 0% packet loss" in out, out
        return "ping"
    if cmd.endswith(" sh"):
        assert f"inet {pods['frontend/client']['ip']}/32" in out, out
        return "shell"
    if cmd.endswith(" ip route"):
        assert "proto bird" in out, out
        return "routes"
    if "iptables-save | grep cali-" in cmd:
        assert "cali-FORWARD" in out and "cali-tw-" in out, out
        return "chains"
    if cmd.endswith("get pods -A -o wide"):
        rows = {tuple(r.split()[:2]): r.split()[3] for r in out.splitlines()[1:]}
        assert rows == {tuple(k.split("/")): v["ip"] for k, v in pods.items()}, out
        return "pods"
    if cmd.endswith("get networkpolicies -A"):
        assert {tuple(r.split()[:2]) for r in out.splitlines()[1:]} == {
            ("backend", "default-deny"), ("backend", "allow-web-to-db")}, out
        return "policies"
    if cmd.endswith("tortiectl status"):
        assert "in sync" in out and f"Endpoints on this node: {len(node1)}" in out, out
        assert all(pods[k]["ip"] in out for k in node1), out
        return "status"
    if cmd.endswith("tortiectl ipam show"):
        assert all(pods[k]["ip"] in out for k in node1), out
        return "ipam"
    raise AssertionError(f"a demo hint no test checks: {cmd!r} (add it to check_hint)")


def demo(cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DEMO, cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_demo_up_shows_the_policy_then_down_removes_everything():
    if os.path.exists(STATE_FILE):
        pytest.skip(f"a demo is already running ({STATE_FILE}); not touching it")
    ensure_binary()
    try:
        up = demo("up")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        with open(STATE_FILE) as f:
            state = json.load(f)
        prefix, work = state["prefix"], state["work"]
        namespaces = [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]
        # 3 nodes, the underlay and 4 pods
        assert len([ns for ns in namespaces if "-n" in ns[len(prefix):]]) == 3 and len(namespaces) == 8
        procs = {proc_identity(int(pid)) for ns in namespaces
                 for pid in sh("ip", "netns", "pids", ns).stdout.split()}
        procs |= {proc_identity(pid) for pid in state["pids"]}
        procs.discard(None)
        assert len(procs) >= 3 + 3 + 4 + 1  # agents, BIRDs, pod servers, etcd

        before = matrix_after(up.stdout, "before any policy")
        assert set(before.values()) == {"ok"}, before
        after = matrix_after(up.stdout, "with the policies")
        denied = {cell for cell, v in after.items() if v == "--"}
        assert denied == {(s, d) for s in PODS for d in PODS if not allowed(s, d)}
        assert set(after.values()) == {"ok", "--"}
        print(f"\n{len(denied)} of {len(after)} cells denied after the policies:", sorted(denied))

        # Every hint the demo prints works as printed; the last one takes the demo down.
        tried = hints(up.stdout)
        assert tried[-1] == "make demo-down", tried
        kinds = [check_hint(cmd, run_hint(cmd), state["pods"]) for cmd in tried[:-1]]
        assert sorted(kinds) == sorted({"ping", "shell", "routes", "chains", "pods", "policies", "status",
                                        "ipam"}), kinds
        down = run_hint(tried[-1])
    finally:
        if os.path.exists(STATE_FILE):
            down = demo("down", timeout=120)
    assert down.returncode == 0 and "demo-down: removed 8 namespaces" in down.stdout, down.stdout + down.stderr
    assert not os.path.exists(STATE_FILE)
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]
    assert not os.path.exists(work)
    survivors = {p for p in procs if proc_identity(int(p.split(":")[0])) == p}
    assert not survivors, survivors
    for pid in os.listdir("/proc"):  # nothing that names the demo's files or namespaces
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            assert work not in cmd and f"{prefix}-" not in cmd, (pid, cmd)


def test_demo_down_with_no_demo_says_so():
    if os.path.exists(STATE_FILE):
        pytest.skip(f"a demo is running ({STATE_FILE}); `make demo-down` would remove it")
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    p = subprocess.run([make, "-s", "demo-down"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "no demo is running" in p.stdout, p.stdout + p.stderr
