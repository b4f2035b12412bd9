"""`make image` on a machine with no docker engine (this one): podman or buildah builds the
image, the base made from Debian packages where no registry has it (deploy/base-image.sh),
and the image really runs the agent, tortiectl, the CNI bundle and the dataplane tools.

Machine safety is checked, not assumed: podman's default bridge networking (netavark or
CNI) would add nft tables/iptables chains and set ip_forward=1 in the ROOT namespace the
first time a build or run used it.  The build script uses host networking and chroot
isolation; the root namespace's rulesets and forwarding sysctls are snapshotted before and
compared after the build and the runs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding", "net/ipv4/conf/default/forwarding",
           "net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/forwarding")
RULE_DUMPS = {
    "nft": ["nft", "list", "ruleset"],
    "iptables-nft": ["iptables-nft-save"], "ip6tables-nft": ["ip6tables-nft-save"],
    "iptables-legacy": ["iptables-legacy-save"], "ip6tables-legacy": ["ip6tables-legacy-save"],
}
COUNTERS = re.compile(r"\[\d+:\d+\]|packets \d+ bytes \d+")


def root_netns_state() -> dict[str, str]:
    """What podman's network setup would change in the root namespace (counters and the
    dump's timestamp comments excluded: traffic moves those)."""
    state: dict[str, str] = {}
    for name, cmd in RULE_DUMPS.items():
        if shutil.which(cmd[0]) is None:
            continue
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        state[name] = COUNTERS.sub("", "\n".join(ln for ln in out.splitlines() if not ln.startswith("#")))
    for key in SYSCTLS:
        with open(f"/proc/sys/{key}") as f:
            state[key] = f.read().strip()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    state["container bridges"] = " ".join(sorted(re.findall(r"^\d+: ((?:cni-)?podman\d*|netavark\w*)[:@]", links, re.M)))
    return state


def docker_engine_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def run_in_image(image: str, script: str) -> subprocess.CompletedProcess:
    """Host network (no bridge), runc (crun refuses this machine's hybrid cgroups) and
    rlimits no higher than this sandbox's own (podman's defaults cannot be set here)."""
    nofile = os.sysconf("SC_OPEN_MAX")
    return subprocess.run(
        ["podman", "--runtime", "runc", "run", "--rm", "--network", "host",
         "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=32768:32768",
         image, "sh", "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(1800)
def test_make_image_without_docker_engine(tmp_path):
    if docker_engine_works():
        pytest.skip("a docker engine answers here: make image uses it (this test covers podman/buildah)")
    tag = f"localhost/tortie:imagetest-{os.getpid()}"
    archive = tmp_path / "tortie.oci.tar"
    probe = tmp_path / "build-probe"
    probe.write_text("a file mounted into RUN steps only\n")
    before = root_netns_state()
    try:
        env = {**os.environ, "TAG": tag, "IMAGE_ARCHIVE": str(archive),
               # a pass-through flag: a read-only mount, present while RUN steps run only
               "IMAGE_BUILD_FLAGS": f"-v {probe}:/etc/tortie-build-probe:ro"}
        p = subprocess.run(["make", "-s", "image"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=1700)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "host network, chroot isolation" in p.stdout

        checks = run_in_image(tag, " && ".join([
            "tortie-agent --help | grep -q 'usage: tortie-agent'",
            "tortiectl --help | grep -q 'usage: tortiectl'",
            "echo '{\"cniVersion\":\"1.1.0\"}' | CNI_COMMAND=VERSION /opt/tortie/cni/tortie-cni | grep -q supportedVersions",
            "bird --version 2>&1 | grep -q 'BIRD version 2'",
            "iptables-nft --version | grep -q nf_tables",
            "iptables-legacy --version | grep -q legacy",
            "ipset --version 2>&1 | grep -q 'ipset v7'",
            "ip -V", "conntrack --version",
            "test -x /opt/tortie/install-cni.sh -a -x /opt/tortie/uninstall-node.sh",
            # left in the build stage: no build tools, PyInstaller or pip next to the agent
            "! command -v objdump", "! test -e /opt/tortie/venv/bin/pip",
            "! python3 -c 'import PyInstaller' 2>/dev/null",
            # the mount's content never lands (buildah leaves an empty mount point behind)
            "! grep -qs 'RUN steps only' /etc/tortie-build-probe",
        ]))
        assert checks.returncode == 0, checks.stdout + checks.stderr

        with tarfile.open(archive) as t:
            names = t.getnames()
        assert "index.json" in names and "oci-layout" in names
        size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", tag],
                              capture_output=True, text=True).stdout.strip()
        print(f"image {tag}: {int(size) / 1e6:.0f} MB, OCI archive {archive.stat().st_size / 1e6:.0f} MB")
    finally:
        if shutil.which("podman"):
            subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
        after = root_netns_state()
    assert after == before, "the build changed the root network namespace"
