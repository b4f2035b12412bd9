"""deploy/build-image.sh picks docker, podman or buildah and passes the flags that keep the
build off the root network namespace; deploy/base-image.sh finds the machine's Debian mirror.
The tools are stand-ins here that record their arguments (the real build, with podman, is
tests/integration/test_image_build.py)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what the scripts need besides the container tools
BASICS = ("dirname", "basename", "sed", "head", "realpath", "du", "cut", "rm", "awk", "cat")


def fake_bin(tmp_path, tools: dict[str, str]):
    """A PATH with only BASICS and the given fake tools (shell bodies)."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in BASICS:
        os.symlink(shutil.which(name), d / name)
    for name, body in tools.items():
        f = d / name
        f.write_text("#!/bin/sh\n" + body + "\n")
        f.chmod(0o755)
    return str(d)


def build_image(path: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), "deploy/build-image.sh"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": path, **env}, timeout=60)


def recorder(log) -> str:
    """A podman/buildah/docker that says its base image is here and logs every call."""
    return f'echo "$(basename $0) $*" >> {log}\nexit 0'


def test_no_engine_and_no_daemonless_tool(tmp_path):
    """A docker CLI whose engine does not answer, no podman or buildah: a plain message."""
    path = fake_bin(tmp_path, {"docker": 'echo "Cannot connect to the engine" >&2; exit 1'})
    p = build_image(path)
    assert p.returncode == 2
    assert "neither podman nor buildah" in p.stderr and "make image-deps" in p.stderr
    assert "Cannot connect" not in p.stderr  # the probe's own noise is not shown


@pytest.mark.parametrize("tool", ["podman", "buildah"])
def test_daemonless_build_flags(tmp_path, tool):
    log = tmp_path / "calls"
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = fake_bin(tmp_path, {"docker": "exit 1", tool: recorder(log)})
    p = build_image(path, TAG="example/tortie:t1", IMAGE_CA_BUNDLE=str(ca),
                    IMAGE_BUILD_FLAGS="-v /etc/pip.conf:/etc/pip.conf:ro --build-arg X=1")
    assert p.returncode == 0, p.stderr
    build = [ln for ln in log.read_text().splitlines() if " build " in ln or " bud " in ln]
    assert len(build) == 1
    args = build[0].split()
    assert args[:2] == ([tool, "build"] if tool == "podman" else ["buildah", "bud"])
    # never the default bridge network (it writes nft rules and ip_forward in the root netns)
    assert args[args.index("--network") + 1] == "host"
    assert args[args.index("--isolation") + 1] == "chroot"
    assert "--pull=never" in args  # the base is local: no registry is asked
    assert f"{ca}:/etc/ssl/certs/ca-certificates.crt:ro" in args
    i = args.index("/etc/pip.conf:/etc/pip.conf:ro")
    assert args[i - 1:i + 3] == ["-v", "/etc/pip.conf:/etc/pip.conf:ro", "--build-arg", "X=1"]
    assert args[-3:] == ["-t", "example/tortie:t1", "."]


def test_base_from_registry_when_asked(tmp_path):
    """BASE_FROM=pull: the base is pulled by the build if missing, debootstrap is not run."""
    log = tmp_path / "calls"
    path = fake_bin(tmp_path, {"docker": "exit 1", "podman": f'echo "podman $*" >> {log}\n'
                               '[ "$1 $2" = "image exists" ] && exit 1\nexit 0'})
    p = build_image(path, BASE_FROM="pull", IMAGE_CA_BUNDLE="")
    assert p.returncode == 0, p.stderr
    assert "base-image" not in p.stdout + p.stderr
    build = [ln for ln in log.read_text().splitlines() if " build " in ln][0].split()
    assert "--pull=missing" in build and "-v" not in build


def test_docker_engine_gets_proxies_as_build_args(tmp_path):
    log = tmp_path / "calls"
    path = fake_bin(tmp_path, {"docker": recorder(log), "podman": "exit 3"})
    p = build_image(path, HTTPS_PROXY="http://user:secret@proxy:3128")
    assert p.returncode == 0, p.stderr
    args = [ln for ln in log.read_text().splitlines() if " build " in ln][0].split()
    # the name only: docker reads the value from the environment, and keeps predefined
    # proxy arguments out of the image's history
    assert args[args.index("--build-arg") + 1] == "HTTPS_PROXY"
    assert "secret" not in " ".join(args)
    assert args[args.index("--network") + 1] == "host"


def test_base_image_finds_the_mirror_in_apt_sources(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "other.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] https://vendor.example/apt stable main\n")
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    p = subprocess.run(["bash", "deploy/base-image.sh", "--mirrors"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "APT_ETC": str(etc)}, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["http://mirror.example/debian", "http://mirror.example/debian-security"]

    (etc / "sources.list.d" / "debian.sources").unlink()
    (etc / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://one.example/debian bookworm main\n")
    p = subprocess.run(["bash", "deploy/base-image.sh", "--mirrors"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "APT_ETC": str(etc)}, timeout=30)
    assert p.stdout.split() == ["http://one.example/debian"]

    (etc / "sources.list").unlink()
    p = subprocess.run(["bash", "deploy/base-image.sh", "--mirrors"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "APT_ETC": str(etc)}, timeout=30)
    assert p.returncode == 1 and "set DEBIAN_MIRROR" in p.stderr
