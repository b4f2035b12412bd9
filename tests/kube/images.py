"""Container images without a registry: docker-save archives (manifest.json, a config JSON,
one layer tar) written from files on this machine, for `ctr images import`.

  busybox   docker.io/library/busybox:1.29 - Debian's busybox-static with its applet links
            (its wget segfaults in a container; the e2e specs here use nc)
  agnhost   k8s.gcr.io/e2e-test-images/agnhost:2.21 - agnhost built static from the same
            Kubernetes tree, plus busybox (specs run `sh -c` in it) and, as upstream's image
            has them, Debian's curl, wget, OpenBSD nc and dash as /bin/sh, with their shared libraries (the
            sig-network specs run `curl .../dial`, `nc -zv -u`, `wget -T 1`; busybox's nc has
            no -z/-u and its wget segfaults)
  pause     k8s.gcr.io/pause:3.2 - build/pause/linux/pause.c of the tree, compiled static

The tags are the ones the v1.20.2 e2e framework asks for (test/utils/image/manifest.go)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile

BUSYBOX = "docker.io/library/busybox:1.29"
AGNHOST = "k8s.gcr.io/e2e-test-images/agnhost:2.21"
PAUSE = "k8s.gcr.io/pause:3.2"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o755,
         link: str | None = None, kind: bytes = tarfile.REGTYPE) -> None:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime = mode, 0
    if kind == tarfile.DIRTYPE:
        ti.type = tarfile.DIRTYPE
        tar.addfile(ti)
    elif link is not None:
        ti.type, ti.linkname = tarfile.SYMTYPE, link
        tar.addfile(ti)
    else:
        ti.size = len(data or b"")
        tar.addfile(ti, io.BytesIO(data or b""))


# the dynamically linked tools copied into agnhost: path in the image -> path here
# (/bin/sh is dash: busybox's sh runs its own applets before PATH, so `sh -c "nc -u"` would
# still reach busybox's nc)
AGNHOST_TOOLS = {"usr/bin/curl": "/usr/bin/curl", "usr/bin/wget": "/usr/bin/wget", "usr/bin/nc": "/bin/nc.openbsd",
                 "bin/sh": "/bin/dash"}
# bumped when the agnhost layer's contents change: the cached archive is keyed by it
AGNHOST_LAYOUT = 5


def _busybox_files(tar: tarfile.TarFile, replaced: frozenset[str] = frozenset()) -> None:
    bb = "/bin/busybox"
    with open(bb, "rb") as f:
        _add(tar, "bin/busybox", f.read())
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp", "root", "proc", "sys", "dev"):
        _add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
    applets = subprocess.run([bb, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "bin/busybox" and a not in replaced:
            _add(tar, a, link="/bin/busybox")
    _add(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
    _add(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)


def shared_libraries(binary: str) -> list[str]:
    """The files the dynamic loader maps for `binary` (ldd's list, the loader included)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(path)
    return libs


def _dynamic_tools(tar: tarfile.TarFile, tools: dict[str, str]) -> None:
    """tools (image path -> host path) and every library they load, at the paths ldd names
    (regular files: the image has no /lib -> usr/lib link)."""
    libs = sorted({lib for src in tools.values() for lib in shared_libraries(src)})
    dirs = sorted({os.path.dirname(p.lstrip("/")) for p in libs})
    for d in dirs:
        for i in range(1, d.count("/") + 2):
            _add(tar, "/".join(d.split("/")[:i]), kind=tarfile.DIRTYPE)
    for dst, src in [*tools.items(), *((p.lstrip("/"), p) for p in libs)]:
        with open(os.path.realpath(src), "rb") as f:
            _add(tar, dst, f.read())


def _archive(path: str, tag: str, fill, entrypoint: list[str] | None, cmd: list[str] | None) -> str:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as t:
        fill(t)
    data = layer.getvalue()
    diff = hashlib.sha256(data).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [PATH_ENV], "Entrypoint": entrypoint, "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff}"]},
    }).encode()
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [tag], "Layers": [f"{diff}/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as out:
        _add(out, cfg_name, config, 0o644)
        _add(out, diff, kind=tarfile.DIRTYPE)
        _add(out, f"{diff}/layer.tar", data, 0o644)
        _add(out, "manifest.json", manifest, 0o644)
    return path


def build_pause(src_tree: str, out: str) -> str:
    if not os.path.exists(out):
        subprocess.run(["gcc", "-Os", "-static", "-o", out, os.path.join(src_tree, "build/pause/linux/pause.c")],
                       check=True, capture_output=True)
    return out


def build_all(bin_dir: str, src_tree: str, out_dir: str) -> list[str]:
    """Write the three archives into out_dir (reused when present); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    bb = os.path.join(out_dir, "busybox.tar")
    if not os.path.exists(bb):
        _archive(bb, BUSYBOX, _busybox_files, None, ["sh"])
    paths.append(bb)
    ag = os.path.join(out_dir, f"agnhost-{AGNHOST_LAYOUT}.tar")
    if not os.path.exists(ag):
        def fill(t):
            _busybox_files(t, frozenset(AGNHOST_TOOLS))
            _dynamic_tools(t, AGNHOST_TOOLS)
            with open(os.path.join(bin_dir, "agnhost"), "rb") as f:
                _add(t, "agnhost", f.read())
        # as test/images/agnhost/Dockerfile: with no args it pauses (hostexec pods rely on it)
        _archive(ag, AGNHOST, fill, ["/agnhost"], ["pause"])
    paths.append(ag)
    pa = os.path.join(out_dir, "pause.tar")
    if not os.path.exists(pa):
        pause_bin = build_pause(src_tree, os.path.join(out_dir, "pause"))

        def fill_pause(t):
            with open(pause_bin, "rb") as f:
                _add(t, "pause", f.read())
        _archive(pa, PAUSE, fill_pause, ["/pause"], None)
    paths.append(pa)
    return paths
