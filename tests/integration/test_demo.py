"""`make demo` as a user runs it: deploy/demo.py up prints the reachability matrix before
and after the policies, and deploy/demo.py down leaves nothing behind."""
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
    finally:
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
