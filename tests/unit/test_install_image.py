"""`make image` where no container engine works (this machine: no docker engine, no
podman) stops with a message that says so and what to do, instead of a stack of errors."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESSAGE = "neither a working docker engine nor podman is available"


def make_image(path: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {**os.environ, "PATH": path}
    return subprocess.run([shutil.which("make"), "-s", "image"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_make_image_with_engines_that_do_not_answer(tmp_path):
    """docker and podman CLIs present but no engine behind them (e.g. dockerd not running)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("docker", "podman"):
        f = fake / tool
        f.write_text('#!/bin/sh\necho "Cannot connect to the engine" >&2\nexit 1\n')
        f.chmod(0o755)
    p = make_image(f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    assert p.returncode != 0
    assert MESSAGE in p.stderr and "Dockerfile is ready" in p.stderr
    assert "Cannot connect" not in p.stderr  # the probe's own noise is not shown


def engine_works(tool: str) -> bool:
    if shutil.which(tool) is None:
        return False
    try:
        return subprocess.run([tool, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_make_image_on_this_machine():
    if any(engine_works(t) for t in ("docker", "podman")):
        pytest.skip("a container engine works here: `make image` would really build")
    p = make_image(os.environ.get("PATH", "/usr/bin:/bin"))
    assert p.returncode != 0 and MESSAGE in p.stderr, p.stderr
