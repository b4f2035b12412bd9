"""Host-side sysctls of workload interfaces the agent keeps right on every full pass.

route_localnet: nodes wired by older tortie versions have route_localnet=1 on their
`cali` veths, which lets a pod reach the node's 127.0.0.1 services (calc/raw.py).  The
CNI plumbing now writes 0; this resets any veth that still has 1 (at the agent's first
pass and on every resync), so an upgraded node is fixed without rewiring its pods.
"""
from __future__ import annotations

import os

from podnet import nsutil
from podnet.naming import PREFIX as WL_PREFIX

CONF_DIR = "/proc/sys/net/ipv4/conf"


def reset_route_localnet(netns: str | None = None) -> list[str]:
    """Set route_localnet=0 on every cali* interface that has it on; the names changed.

    netns=None: the calling thread's namespace (the agent runs in the node's)."""
    if netns is None:
        return _reset()
    with nsutil.opened(netns) as fd, nsutil.entered(fd):
        return _reset()


def _reset() -> list[str]:
    changed = []
    try:
        names = os.listdir(CONF_DIR)
    except OSError:
        return []  # no IPv4 in this namespace: nothing to reset
    for name in sorted(names):
        if not name.startswith(WL_PREFIX):
            continue
        path = f"{CONF_DIR}/{name}/route_localnet"
        try:
            with open(path) as f:
                if f.read().strip() == "0":
                    continue
            with open(path, "w") as f:
                f.write("0")
        except OSError:
            continue  # the veth went away between listing and writing: nothing to fix
        changed.append(name)
    return changed
