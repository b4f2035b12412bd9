"""IPv4 forwarding of the node: without net.ipv4.ip_forward=1 the kernel drops every packet
from another node to this node's pods (and from pods out), silently.  A fresh network
namespace starts with 0, so, like Felix, the agent turns it on in the node's namespace;
with ensure_forwarding off, or when the write is refused (read-only /proc/sys in an
unprivileged container), it reports why the node cannot serve pods instead.

The agent runs in the node's namespace and writes /proc/sys directly; tests drive a lab
namespace by name through `sysctl` in that namespace (felix_agent.dataplane.cmd).
"""
from __future__ import annotations

from felix_agent.dataplane import cmd

KEY = "net.ipv4.ip_forward"
PROC_PATH = "/proc/sys/net/ipv4/ip_forward"


class Forwarding:
    def __init__(self, netns: str | None = None, *, ensure: bool = True, proc_path: str = PROC_PATH):
        self.netns = netns
        self.ensure = ensure
        self.proc_path = proc_path  # a file in unit tests (never the root namespace's)

    def _read(self) -> str:
        if self.netns:
            return cmd.run(["sysctl", "-n", KEY], self.netns).stdout.strip()
        with open(self.proc_path) as f:
            return f.read().strip()

    def _write(self) -> None:
        if self.netns:
            cmd.run(["sysctl", "-q", "-w", f"{KEY}=1"], self.netns)
            return
        with open(self.proc_path, "w") as f:
            f.write("1\n")

    def apply(self) -> tuple[bool, str]:
        """(changed, problem): problem is "" when the node forwards after this call."""
        try:
            if self._read() == "1":
                return False, ""
        except (OSError, cmd.CommandError) as e:
            return False, f"cannot read {KEY}: {e}"
        if not self.ensure:
            return False, (f"{KEY} is 0: traffic from other nodes to this node's pods is dropped "
                           "(ensure_forwarding is off: set it to 1 on the node, or turn ensure_forwarding on)")
        try:
            self._write()
            if self._read() == "1":
                return True, ""
            err = "the value did not stick"
        except (OSError, cmd.CommandError) as e:
            err = str(e)
        return False, (f"{KEY} is 0 and cannot be set ({err}): traffic from other nodes to this "
                       "node's pods is dropped; run the agent privileged with a writable /proc/sys, "
                       "or set it on the node")
