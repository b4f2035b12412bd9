"""The CNI plugin as the lab runs it: the built PyInstaller binary (dist/tortie), rebuilt
when older than its sources, or `python -m cni_plugin` when TORTIE_LAB_CNI=module."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(ROOT, "dist", "tortie")
MODULE = [sys.executable, "-m", "cni_plugin"]


def _sources_mtime() -> float:
    paths = glob.glob(os.path.join(ROOT, "cni_plugin", "*.py")) + [
        os.path.join(ROOT, "deploy", "cni_entry.py"), os.path.join(ROOT, "deploy", "build-cni.sh")]
    return max(os.path.getmtime(p) for p in paths if os.path.exists(p))


def ensure_binary() -> str:
    """dist/tortie, built with deploy/build-cni.sh when missing or older than the sources."""
    target = os.path.realpath(BINARY)
    if not os.path.exists(target) or os.path.getmtime(target) < _sources_mtime():
        p = subprocess.run(["bash", os.path.join(ROOT, "deploy", "build-cni.sh")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"deploy/build-cni.sh failed:\n{p.stdout}\n{p.stderr}")
    return BINARY


def cni_command() -> list[str]:
    if os.environ.get("TORTIE_LAB_CNI") == "module":
        return list(MODULE)
    return [ensure_binary()]
