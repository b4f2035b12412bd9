"""deploy/install-cni.sh (the DaemonSet's init container) against a temporary host root:
the binary bundle and the conflist from manifests/tortie.yaml land atomically, an invalid
conflist changes nothing, an upgrade swaps versions without a moment of a missing binary.
Validation is the real one: `python -m cni_plugin --validate-conflist`."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "deploy", "install-cni.sh")
BUILT_BUNDLE = os.path.join(ROOT, "dist", "tortie-cni")
VALIDATE = f"{sys.executable} -m cni_plugin --validate-conflist"


def manifest_conflist() -> str:
    with open(os.path.join(ROOT, "manifests", "tortie.yaml")) as f:
        cm = next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "ConfigMap")
    return cm["data"]["10-tortie.conflist"]


def fake_bundle(path, tag: str) -> str:
    """A onedir-shaped bundle: an executable tortie-cni and an _internal directory."""
    os.makedirs(os.path.join(path, "_internal"))
    exe = os.path.join(path, "tortie-cni")
    with open(exe, "w") as f:
        f.write(f"#!/bin/sh\necho {tag}\n")
    os.chmod(exe, 0o755)
    with open(os.path.join(path, "_internal", "lib.txt"), "w") as f:
        f.write(tag)
    return str(path)


def install(host, bundle: str, conflist_file: str, validate: str | None = VALIDATE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(HOST_ROOT=str(host), CNI_BIN_SRC=bundle, CNI_CONFLIST_FILE=conflist_file)
    if validate is not None:
        env["CNI_VALIDATE"] = validate
    return subprocess.run(["sh", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def tree(root) -> dict[str, str]:
    """Every path under root: symlink target, file content hash, or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha1(f.read()).hexdigest()
    return out


def temp_files(host) -> list[str]:
    return [p for p in tree(host) if os.path.basename(p).startswith(".")]


@pytest.fixture
def conflist(tmp_path):
    p = tmp_path / "10-tortie.conflist"
    p.write_text(manifest_conflist())
    return str(p)


def test_install_lands_bundle_and_conflist(tmp_path, conflist):
    """With the built bundle when there is one, so the installed symlink chain is run."""
    host = tmp_path / "host"
    real = os.path.isfile(os.path.join(BUILT_BUNDLE, "tortie-cni"))
    bundle = BUILT_BUNDLE if real else fake_bundle(tmp_path / "bundle", "v1")
    p = install(host, bundle, conflist)
    assert p.returncode == 0, p.stderr
    bin_dir, net_d = host / "opt/cni/bin", host / "etc/cni/net.d"
    assert os.readlink(bin_dir / "tortie") == "tortie.d/tortie-cni"
    assert os.path.islink(bin_dir / "tortie.d")
    assert os.access(bin_dir / "tortie", os.X_OK)
    conf = net_d / "10-tortie.conflist"
    assert conf.read_bytes() == open(conflist, "rb").read()  # byte for byte
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert temp_files(host) == []
    if real:  # the relocated onedir bundle runs through both symlinks
        r = subprocess.run([str(bin_dir / "tortie")], input='{"cniVersion":"1.1.0"}', env={"CNI_COMMAND": "VERSION"},
                           capture_output=True, text=True, timeout=30)
        assert "supportedVersions" in r.stdout, r.stderr
        r = subprocess.run([str(bin_dir / "tortie"), "--validate-conflist"], stdin=open(conf),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "tortie -> portmap" in r.stdout


@pytest.mark.parametrize("broken", [
    lambda c: c.replace('"type": "tortie"', '"type": "other"'),  # no tortie member
    lambda c: c.replace('"mtu": 1500', '"mtu": "big"'),          # a tortie field of the wrong type
    lambda c: c[: len(c) // 2],                                   # truncated JSON
])
def test_invalid_conflist_changes_nothing(tmp_path, conflist, broken):
    host = tmp_path / "host"
    assert install(host, fake_bundle(tmp_path / "v1", "v1"), conflist).returncode == 0
    before = tree(host)
    bad = tmp_path / "bad.conflist"
    bad.write_text(broken(manifest_conflist()))
    p = install(host, fake_bundle(tmp_path / "v2", "v2"), str(bad))
    assert p.returncode != 0
    assert "invalid conflist" in p.stderr and "not valid; nothing installed" in p.stderr
    assert tree(host) == before  # neither the old conflist nor the binary moved


def test_invalid_conflist_on_a_fresh_node_writes_nothing(tmp_path):
    host = tmp_path / "host"
    bad = tmp_path / "bad.conflist"
    bad.write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": []}))
    p = install(host, fake_bundle(tmp_path / "v1", "v1"), str(bad))
    assert p.returncode != 0 and not host.exists()


def test_default_validation_is_the_new_bundles_own(tmp_path, conflist):
    """Without CNI_VALIDATE the bundle being installed judges the conflist."""
    bundle = fake_bundle(tmp_path / "picky", "picky")
    with open(os.path.join(bundle, "tortie-cni"), "w") as f:
        f.write('#!/bin/sh\n[ "$1" = --validate-conflist ] && { cat >/dev/null; echo no >&2; exit 1; }\n')
    p = install(tmp_path / "host", bundle, conflist, validate=None)
    assert p.returncode != 0 and not (tmp_path / "host").exists()
    if os.path.isfile(os.path.join(BUILT_BUNDLE, "tortie-cni")):
        p = install(tmp_path / "host", BUILT_BUNDLE, conflist, validate=None)
        assert p.returncode == 0, p.stderr


def test_upgrade_swaps_versions_with_no_gap(tmp_path, conflist):
    host = tmp_path / "host"
    bundles = [fake_bundle(tmp_path / f"v{i}", f"v{i}") for i in range(1, 3)]
    assert install(host, bundles[0], conflist).returncode == 0
    tortie = host / "opt/cni/bin/tortie"
    conf = host / "etc/cni/net.d/10-tortie.conflist"
    gaps: list[str] = []
    stop = threading.Event()

    def watch():  # what a kubelet would see at any instant during the upgrades
        while not stop.is_set():
            if not os.access(tortie, os.X_OK):
                gaps.append("binary missing")
            try:
                json.loads(conf.read_text())
            except (OSError, ValueError) as e:
                gaps.append(f"conflist: {e}")

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(6):
            p = install(host, bundles[(i + 1) % 2], conflist)
            assert p.returncode == 0, p.stderr
    finally:
        stop.set()
        t.join()
    assert gaps == []
    out = subprocess.run([str(tortie)], capture_output=True, text=True).stdout.strip()
    assert out == "v1"  # the last of the six runs installed v1
    versions = os.listdir(host / "opt/cni/bin/tortie.versions")
    assert len(versions) == 2  # the current version and the one it replaced
    assert temp_files(host) == []


def test_single_file_binary_and_inline_conflist(tmp_path):
    """CNI_BIN_SRC may be one executable and CNI_CONFLIST the text itself."""
    host = tmp_path / "host"
    exe = tmp_path / "tortie-static"
    exe.write_text("#!/bin/sh\necho one\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(HOST_ROOT=str(host), CNI_BIN_SRC=str(exe), CNI_CONFLIST=manifest_conflist(), CNI_VALIDATE=VALIDATE)
    p = subprocess.run(["sh", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    installed = host / "opt/cni/bin/tortie"
    assert not installed.is_symlink() and os.access(installed, os.X_OK)
    assert json.loads((host / "etc/cni/net.d/10-tortie.conflist").read_text()) == json.loads(manifest_conflist())
    assert temp_files(host) == []


def test_missing_inputs_fail_clearly(tmp_path, conflist):
    p = install(tmp_path / "host", str(tmp_path / "nope"), conflist)
    assert p.returncode != 0 and "no binary bundle" in p.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(HOST_ROOT=str(tmp_path / "host"), CNI_BIN_SRC=fake_bundle(tmp_path / "b", "b"))
    p = subprocess.run(["sh", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "CNI_CONFLIST" in p.stderr
    assert not (tmp_path / "host").exists()

