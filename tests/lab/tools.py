"""Checks that the lab's outside tools exist, with a message that says how to get them."""
from __future__ import annotations

import os
import shutil

# tool -> Debian package that ships it (the same pairs as the Makefile's APT_TOOLS, which
# tests/unit/test_make_deps.py checks)
TOOLS = {
    "ip": "iproute2", "ss": "iproute2", "iptables": "iptables", "iptables-restore": "iptables",
    "ipset": "ipset", "bird": "bird2", "birdc": "bird2", "etcd": "etcd-server",
    "etcdctl": "etcd-client", "ping": "iputils-ping", "iperf3": "iperf3", "conntrack": "conntrack",
}
CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")


def missing_tools(names=None) -> list[str]:
    return [f"{t} (apt package {TOOLS[t]})" for t in (names or TOOLS) if shutil.which(t) is None]


def require_tools(names=None) -> None:
    missing = missing_tools(names)
    if missing:
        raise RuntimeError("missing tools: " + ", ".join(missing) + "; run `make deps` as root")


def cni_plugin_path(name: str) -> str | None:
    """Where a reference CNI plugin (Debian's containernetworking-plugins) lives."""
    for d in CNI_DIRS:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def is_root() -> bool:
    return os.geteuid() == 0


def kernel_has(kind: str, ns_exec) -> bool:
    """Whether the kernel can create a link of `kind` (ipip, vxlan, ...). `ns_exec` runs a
    command in a lab namespace, so the probe device never appears in the root namespace."""
    name = "probe0"
    p = ns_exec("ip", "link", "add", name, "type", kind, check=False)
    if p.returncode != 0:
        return False
    ns_exec("ip", "link", "del", name, check=False)
    return True
