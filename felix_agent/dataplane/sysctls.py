"""The node's sysctls the agent keeps right, checked at the first pass and on every resync.

- net.ipv4.ip_forward=1: without it the kernel drops every packet from another node to
  this node's pods (and from pods out), silently.  A fresh network namespace starts with
  0, so, like Felix, the agent turns it on; with ensure_forwarding off, or when the write
  is refused (read-only /proc/sys in an unprivileged container), it reports why the node
  cannot serve pods instead (a problem: last_error and /readyz).
- net.ipv6.conf.all.forwarding=1 the same way, while an IPv6 pool exists (the plan's
  `families`): only then, because turning it on also stops the node accepting router
  advertisements on every interface, which an IPv4-only node may depend on.
- route_localnet=0 on every `cali` veth: nodes wired by older tortie versions have 1,
  which lets a pod reach the node's 127.0.0.1 services (calc/raw.py).  The CNI plumbing
  writes 0 now; this resets any veth that still has 1, so an upgraded node is fixed
  without rewiring its pods.

Both are files under /proc/sys, which shows the network namespace of the thread that
reads it: with a netns name (the lab) the driver enters it with setns, else it works in
the agent's own.  Unit tests point `proc_sys` at a directory of plain files.
"""
from __future__ import annotations

import logging
import os

from felix_agent.dataplane.driver import ApplyResult, SinglePhase
from felix_agent.logs import kv
from podnet import nsutil
from podnet.naming import PREFIX as WL_PREFIX

log = logging.getLogger("tortie.dataplane")
FORWARD_KEY = "net.ipv4.ip_forward"
# IP version -> (sysctl name, problem key): the one forwarding switch of each family
FORWARD_KEYS = {4: (FORWARD_KEY, "forwarding"), 6: ("net.ipv6.conf.all.forwarding", "forwarding6")}


class SysctlDriver(SinglePhase):
    name = "sysctls"

    def __init__(self, netns: str | None = None, *, ensure_forwarding: bool = True,
                 proc_sys: str = "/proc/sys"):
        self.netns = netns
        self.ensure_forwarding = ensure_forwarding
        self.proc_sys = proc_sys
        self.families: tuple[int, ...] = (4,)

    def wanted(self, plan) -> tuple[int, ...]:
        # The families to forward: IPv4 always, IPv6 with an IPv6 pool.  Otherwise constant,
        # so the driver runs on the first pass and on every full one (something else may
        # turn forwarding off again).
        return tuple(sorted({4, *plan.families}))

    def set_desired(self, wanted) -> None:
        self.families = tuple(wanted)

    def apply(self, full: bool) -> ApplyResult:
        if self.netns is None:
            return self._apply()
        with nsutil.opened(self.netns) as fd, nsutil.entered(fd):
            return self._apply()

    def _apply(self) -> ApplyResult:
        res = ApplyResult()
        for version in self.families:
            key, topic = FORWARD_KEYS[version]
            changed, problem = self._forwarding(key)
            if changed:
                res.changes[topic] = f"{key}=1"
            if problem:
                res.problems[topic] = problem
        reset = self._reset_route_localnet()
        if reset:
            log.warning("route_localnet was on for pod interfaces; turned off",
                        extra=kv(interfaces=",".join(reset)))
            res.changes["route_localnet_reset"] = len(reset)
        return res

    # -- ip_forward --

    def _forwarding(self, key: str) -> tuple[bool, str]:
        """(changed, problem) for sysctl `key`: problem is "" when the node forwards that
        family after this call."""
        path = os.path.join(self.proc_sys, key.replace(".", "/"))
        try:
            if _read(path) == "1":
                return False, ""
        except OSError as e:
            return False, f"cannot read {key}: {e}"
        if not self.ensure_forwarding:
            return False, (f"{key} is 0: traffic from other nodes to this node's pods is dropped "
                           "(ensure_forwarding is off: set it to 1 on the node, or turn ensure_forwarding on)")
        try:
            _write(path, "1")
            if _read(path) == "1":
                return True, ""
            err = "the value did not stick"
        except OSError as e:
            err = str(e)
        return False, (f"{key} is 0 and cannot be set ({err}): traffic from other nodes to this "
                       "node's pods is dropped; run the agent privileged with a writable /proc/sys, "
                       "or set it on the node")

    # -- route_localnet --

    def _reset_route_localnet(self) -> list[str]:
        """Set route_localnet=0 on every cali* interface that has it on; the names changed."""
        conf = os.path.join(self.proc_sys, "net/ipv4/conf")
        try:
            names = os.listdir(conf)
        except OSError:
            return []  # no IPv4 in this namespace: nothing to reset
        changed = []
        for name in sorted(n for n in names if n.startswith(WL_PREFIX)):
            path = f"{conf}/{name}/route_localnet"
            try:
                if _read(path) == "0":
                    continue
                _write(path, "0")
            except OSError:
                continue  # the veth went away between listing and writing: nothing to fix
            changed.append(name)
        return changed


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value + "\n")
