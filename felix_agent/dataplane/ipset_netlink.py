"""Member changes to existing ipsets over nfnetlink, for the ipset driver's small batches.

Why: a pod's ADD or DEL changes a handful of members (its address in cali40wl-src, in the
sets of the selectors that match it), and an `ipset restore` run costs 1-2.5 ms whatever
its size (fork and exec from the agent, the tool's own start-up), against ~0.15 ms an
entry over one netlink socket that stays open (pyroute2's IPSet; figures in the README).
Creating, destroying and swapping sets, and large batches, stay with `ipset restore`.

Only the set dimensions ip, net and iface are spoken here (the canonical member text of
those passes to pyroute2 as it is); a batch with anything else goes to restore.
"""
from __future__ import annotations

import os
import socket

from podnet.nsutil import entered, netns_path
from pyroute2 import IPSet
from pyroute2.netlink.exceptions import NetlinkError

from felix_agent.dataplane.cmd import CommandError

DIMENSIONS = frozenset({"ip", "net", "iface"})


class IpsetNetlink:
    """One nfnetlink socket opened in `netns` (None: the caller's own namespace), kept
    for the next batch.  Not thread-safe: the driver calls it under its lock."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock: IPSet | None = None
        self.ops = 0  # member changes sent, for tests and figures

    def _socket(self) -> IPSet:
        if self._sock is None:
            if self.netns:
                # A netlink socket belongs to the namespace it was created in, whichever
                # thread uses it later: enter, create, leave.
                fd = os.open(netns_path(self.netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    with entered(fd):
                        self._sock = IPSet()
                finally:
                    os.close(fd)
            else:
                self._sock = IPSet()
        return self._sock

    def apply(self, ops: list[tuple[str, str, str]], kinds: dict[str, tuple[str, str]]) -> None:
        """`ops`: (add|del, set, canonical member); `kinds`: set -> (its dimensions as
        pyroute2 names them, e.g. "net,iface"; family).  As
        `ipset restore -exist`: adding a present member or deleting an absent one is no
        error.  Raises CommandError (what the kernel refused, e.g. a set someone
        destroyed); the members changed before the refusal stay changed, as with restore."""
        verb = name = member = ""
        try:
            s = self._socket()
            for verb, name, member in ops:
                etype, family = kinds[name]
                call = s.add if verb == "add" else s.delete
                call(name, member.split(","), etype=etype, exclusive=False,
                     family=socket.AF_INET6 if family == "inet6" else socket.AF_INET)
                self.ops += 1
        except (NetlinkError, OSError) as e:
            self.close()  # a socket in an unknown state is not reused
            code = getattr(e, "code", None) or getattr(e, "errno", None)
            raise CommandError(["ipset", verb, name, member], code, f"netlink: {e}", self.netns) from e

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            try:
                sock.close()
            except OSError:
                pass


def member_ops(lines: list[str], kinds: dict[str, tuple[str, str]], limit: int
               ) -> list[tuple[str, str, str]] | None:
    """A planned restore batch as (verb, set, member) when netlink can do it instead: only
    member adds and deletes, on sets of the dimensions above, at most `limit` of them.
    None otherwise."""
    if not lines or len(lines) > limit:
        return None
    ops = []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) != 3 or parts[0] not in ("add", "del") or parts[1] not in kinds:
            return None
        verb, name, member = parts
        if not set(kinds[name][0].split(",")) <= DIMENSIONS:
            return None
        ops.append((verb, name, member))
    return ops
