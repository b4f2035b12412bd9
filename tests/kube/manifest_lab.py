"""The kube lab with tortie installed the way a user installs it: the image imported into each
node's containerd, then ONLY `kubectl apply -f manifests/tortie.yaml` (the DaemonSet's init
container writes the CNI binary and conflist, the agent runs in the pod on the node's
network with BIRD inside).

The lab's nodes share one filesystem, and the DaemonSet's hostPaths (/opt/cni/bin,
/etc/cni/net.d, /var/lib/tortie, /var/run/tortie, /var/log/tortie) are the same on every
node.  So each node gets a mount namespace of its own, in which those paths are bind mounts
of the node's directories; its containerd, kubelet and kube-proxy run in it (a holder
process keeps it).  The manifests stay exactly as shipped.  Mounts from the root namespace
propagate in (slave), none made inside (kubelet volumes, container rootfs) come out; they
vanish with the namespace at teardown.  Mount points missing on the host are created empty
and removed again.

    python -m tests.kube.manifest_lab up     # build or reuse everything, apply the manifest
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tests.kube.cluster import BASE, ROOT, KubeLab, KubeLabError, Node, run, teardown, wait_for

IMAGE = "docker.io/library/tortie:dev"  # what `image: tortie:dev` in the manifests resolves to
IMAGE_CACHE = os.environ.get("IMAGE_CACHE", "/var/cache/tortie-image")


def node_binds(n: Node) -> dict[str, str]:
    """host path (as the manifests name it) -> the node's own directory."""
    return {"/opt/cni/bin": n.cni_bin, "/etc/cni/net.d": n.cni_conf,
            "/var/lib/tortie": os.path.join(n.agent_dir, "state"), "/run/tortie": os.path.join(n.agent_dir, "run"),
            "/var/log/tortie": os.path.join(n.agent_dir, "log")}


def image_archive(tag: str = IMAGE, out_dir: str = IMAGE_CACHE) -> str:
    """`make image`, then the image as a docker archive named `tag` for `ctr images import`."""
    p = subprocess.run(["make", "-s", "-C", ROOT, "image"], capture_output=True, text=True, timeout=3000)
    if p.returncode != 0:
        raise KubeLabError(f"make image failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
    return save_image("localhost/tortie:dev", tag, out_dir)


def save_image(src: str, tag: str, out_dir: str = IMAGE_CACHE) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, tag.rsplit("/", 1)[-1].replace(":", "-") + ".tar")
    run(["podman", "tag", src, tag])
    if os.path.exists(path):
        os.unlink(path)
    run(["podman", "save", "--format", "docker-archive", "-o", path, tag], timeout=600)
    return path


def retag_new_image(src: str, tag: str, label: str) -> str:
    """A new image (own config and digest, same layers) under `tag`: what a release with a new
    tag looks like to the DaemonSet, without a second full build."""
    ctr = run(["buildah", "from", "--pull=never", src]).stdout.strip()
    try:
        run(["buildah", "config", "--label", label, ctr])
        run(["buildah", "commit", "--quiet", ctr, tag])
    finally:
        run(["buildah", "rm", ctr], check=False)
    return save_image(tag, tag)


@dataclass
class ManifestLab(KubeLab):
    # "tm", not the kube lab's "tk": `cluster down` without a prefix removes every tk cluster
    prefix: str = field(default_factory=lambda: f"tm{secrets.token_hex(3)}")
    image_archives: list[str] = field(default_factory=list)
    holders: dict[str, int] = field(default_factory=dict)  # node ns -> holder pid
    made_mountpoints: list[str] = field(default_factory=list)

    def enter(self, ns: str) -> list[str]:
        pid = self.holders.get(ns)
        if pid is None:
            return super().enter(ns)
        return ["nsenter", f"--net=/run/netns/{ns}", f"--mount=/proc/{pid}/ns/mnt"]

    def mount_ns(self, n: Node) -> None:
        binds = node_binds(n)
        for target, src in binds.items():
            os.makedirs(src, exist_ok=True)
            made, d = [], target
            while not os.path.exists(d):
                made.append(d)
                d = os.path.dirname(d)
            if made:
                os.makedirs(target)
                self.made_mountpoints += made
                with open(os.path.join(self.dir, "made-mountpoints"), "a") as f:
                    f.write("".join(m + "\n" for m in made))
        # "/" shared inside (this host's own "/" is private): containerd refuses
        # HostToContainer propagation (the manifest's /var/run/netns) from a private mount
        script = "set -e; mount --make-rshared /; " + "; ".join(f"mount --bind {src} {t}" for t, src in binds.items()) + "; exec sleep infinity"
        p = self.popen(f"mountns-{n.name}", n.ns, ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script])

        def bound() -> bool:
            self._check_alive(f"mountns-{n.name}")
            with open(f"/proc/{p.pid}/mountinfo") as f:
                points = {line.split()[4] for line in f}
            return set(binds) <= points
        wait_for(bound, 10, f"the mount namespace of {n.name}", interval=0.1)
        self.holders[n.ns] = p.pid

    def start_node(self, n: Node, images: list[str]) -> None:
        self.mount_ns(n)
        super().start_node(n, images + self.image_archives)

    def node_run(self, n: Node, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in the node as its processes see it (its network and mount namespace)."""
        p = subprocess.run([*self.enter(n.ns), *argv], capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise KubeLabError(f"{argv} on {n.name} failed: {p.stderr.strip()}")
        return p

    def import_image(self, archive: str) -> None:
        for n in self.nodes:
            run(["ctr", "--address", n.sock, "-n", "k8s.io", "images", "import", "--no-unpack", archive], timeout=600)

    def apply_manifest(self, path: str) -> None:
        self.kubectl("apply", "-f", os.path.join(ROOT, path))

    def rollout_status(self, ds: str, namespace: str, timeout: int = 300) -> str:
        return self.kubectl("-n", namespace, "rollout", "status", f"ds/{ds}", f"--timeout={timeout}s",
                            timeout=timeout + 30).stdout

    def install_tortie(self, pool_mode: str | None = None) -> None:
        """Only the manifest: kubectl apply -f manifests/tortie.yaml."""
        if pool_mode:
            raise KubeLabError("the manifest install takes the pool mode of manifests/tortie.yaml")
        self.apply_manifest("manifests/tortie.yaml")

    def wait_agents_ready(self, timeout: float = 300) -> None:
        """The DaemonSet has a pod for every node (rollout status passes at once while it has
        none), then its rollout is done."""
        wait_for(lambda: self.kjson("-n", "tortie-system", "get", "ds", "tortie-node")["status"]
                 .get("desiredNumberScheduled") == len(self.nodes), 120, "a tortie-node pod for every node")
        self.rollout_status("tortie-node", "tortie-system", int(timeout))

    def down(self) -> None:
        down(self.prefix, self.procs)


def down(prefix: str, procs: dict | None = None) -> None:
    """teardown(), then the mount points this lab made on the host (listed in its dir)."""
    try:
        with open(os.path.join(BASE, prefix, "made-mountpoints")) as f:
            made = [line.strip() for line in f if line.strip()]
    except OSError:
        made = []
    teardown(prefix, procs)
    for d in sorted(set(made), key=len, reverse=True):
        try:
            os.rmdir(d)  # empty: nothing of a node was ever written through it
        except OSError:
            pass


def up(prefix: str | None = None) -> ManifestLab:
    lab = ManifestLab(**({"prefix": prefix} if prefix else {}))
    lab.image_archives = [image_archive()]
    return lab.up_or_remove("manifest lab")


if __name__ == "__main__":
    if sys.argv[1:2] == ["up"]:
        t0 = time.monotonic()
        lab = up()
        print(f"cluster {lab.prefix} up with tortie from the manifest in {time.monotonic() - t0:.0f} s;"
              f" remove it with: python -m tests.kube.manifest_lab down {lab.prefix}")
    elif sys.argv[1:2] == ["down"]:
        for prefix in sys.argv[2:]:
            down(prefix)
    else:
        print(__doc__)
