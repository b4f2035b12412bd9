"""Shared pieces of the CNI integration tests (no tests here): the built binary, the two
ways to run the plugin, a per-test host-local network, and probes for leftovers."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from tests.lab.cni_runtime import Attachment, PluginRun, invoke, k8s_args
from tests.lab import Lab, cni_plugin_path

from tests.lab.cnibin import BINARY, MODULE, ROOT
from tests.lab.cnibin import ensure_binary as _ensure_binary

CNI_DIR = "/usr/lib/cni"


def ensure_binary() -> str:
    try:
        return _ensure_binary()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def tortie_binary() -> str:
    return ensure_binary()


@pytest.fixture(params=["binary", "module"])
def runner(request) -> list[str]:
    """The built binary and `python -m cni_plugin`: both must behave the same."""
    if request.param == "binary":
        return [request.getfixturevalue("tortie_binary")]
    return list(MODULE)


def require_cni_plugins(*names: str) -> None:
    missing = [n for n in names if cni_plugin_path(n) is None]
    if missing:
        pytest.skip("containernetworking-plugins missing: " + ", ".join(missing))


@dataclass
class Net:
    """One node's tortie network with host-local IPAM, everything under a tmp dir."""
    lab: Lab
    node_ns: str
    tmp: str
    argv: list[str]
    name: str = "k8s-pod-network"
    subnet: str = "10.244.1.0/24"
    subnet6: str | None = None
    version: str = "1.0.0"
    extra: dict = field(default_factory=dict)
    cni_path: str = CNI_DIR

    @property
    def data_dir(self) -> str:
        return os.path.join(self.tmp, "ipam")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.tmp, "state")

    @property
    def log_file(self) -> str:
        return os.path.join(self.tmp, "log", "cni.log")

    def conf(self, **over) -> dict:
        ranges = [[{"subnet": self.subnet}]]
        if self.subnet6:
            ranges.append([{"subnet": self.subnet6}])
        c = {"cniVersion": self.version, "name": self.name, "type": "tortie", "mtu": 1450,
             "log_file_path": self.log_file, "log_level": "debug", "state_dir": self.state_dir,
             "ipam": {"type": "host-local", "dataDir": self.data_dir, "ranges": ranges}}
        c.update(self.extra)
        c.update(over)
        return c

    def attachment(self, pod_ns: str, pod: str, container_id: str | None = None, ifname: str = "eth0") -> Attachment:
        return Attachment(container_id or f"c-{pod}", f"/var/run/netns/{pod_ns}", ifname,
                          k8s_args("default", pod), self.cni_path)

    def run(self, command: str, att: Attachment | None, conf: dict | bytes | None = None,
            **kw) -> PluginRun:
        return invoke(self.argv, command, self.conf() if conf is None else conf, att, self.node_ns,
                      cni_path=self.cni_path, **kw)

    def add(self, pod_ns: str, pod: str, **over) -> tuple[Attachment, dict]:
        att = self.attachment(pod_ns, pod)
        r = self.run("ADD", att, self.conf(**over))
        assert r.ok, f"ADD failed: {r.stdout} {r.stderr}"
        return att, r.output

    # -- leftovers ---------------------------------------------------------------------

    def allocated(self) -> list[str]:
        """Addresses host-local holds (its dataDir has one file per address)."""
        d = os.path.join(self.data_dir, self.name)
        out = []
        for n in os.listdir(d) if os.path.isdir(d) else []:
            try:
                ipaddress.ip_address(n)
                out.append(n)
            except ValueError:
                pass
        return sorted(out)

    def records(self) -> list[str]:
        d = os.path.join(self.state_dir, self.name)
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def cali_links(self) -> list[str]:
        out = self.lab.exec(self.node_ns, "ip", "-o", "link", "show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.split(":")[1].strip().startswith("cali")]

    def host_routes(self) -> list[str]:
        return [r for r in self.lab.exec(self.node_ns, "ip", "route").stdout.splitlines() if "cali" in r]

    def assert_nothing_left(self) -> None:
        assert self.cali_links() == []
        assert self.host_routes() == []
        assert self.allocated() == []
        assert self.records() == []


def make_net(lab: Lab, tmp_path, argv: list[str], node: int = 0, **kw) -> Net:
    require_cni_plugins("host-local")
    return Net(lab=lab, node_ns=lab.nodes[node].ns, tmp=str(tmp_path), argv=argv, **kw)


def pod_ip(result: dict, family: int = 4) -> str:
    for ip in result["ips"]:
        addr = ipaddress.ip_interface(ip["address"])
        if addr.version == family:
            return str(addr.ip)
    raise AssertionError(f"no IPv{family} address in {json.dumps(result)}")
