"""The kernel-object drivers as driver.Driver: each takes its slice of the Plan and hands
it to the mechanism that reconciles it (ipsets.py, iptables.py, tunnels.py, routes.py,
which know nothing of plans and are tested on their own)."""
from __future__ import annotations

from felix_agent.calc.plan import Plan, VxlanWanted
from felix_agent.calc.routes import IPIP_DEVICE
from felix_agent.dataplane.cmd import CommandError
from felix_agent.dataplane.driver import ApplyResult, SinglePhase
from felix_agent.dataplane.ipsets import IpsetDriver
from felix_agent.dataplane.iptables import IptablesTable
from felix_agent.dataplane.routes import RouteDriver
from felix_agent.dataplane.tunnels import IpipDevice, KernelModuleMissing, VxlanDevice


def _changes(key: str, ch) -> dict[str, object]:
    return {key: str(ch)} if ch else {}


class IpsetsDriver:
    """Sets are created and filled before the rules that match on them are written, and
    destroyed only after those rules are gone (the second phase)."""

    name = "ipsets"

    def __init__(self, netns: str | None):
        self.sets = IpsetDriver(netns)

    def wanted(self, plan: Plan):
        return plan.state.ipsets

    def set_desired(self, wanted) -> None:
        self.sets.set_desired(wanted)

    def apply(self, full: bool) -> ApplyResult:
        up = self.sets.apply_updates(full)
        return ApplyResult(_changes("ipsets", up), failed=bool(up.failed))

    def apply_removals(self, full: bool) -> ApplyResult:
        dels = self.sets.apply_deletions(full)
        return ApplyResult(_changes("ipsets_deleted", dels), failed=bool(dels.failed))


class IptablesDriver(SinglePhase):
    """One table of one IP version.  Between resyncs the table plans against its own view
    of what it wrote (no iptables-save); a full pass reads the table and repairs drift."""

    def __init__(self, table: IptablesTable):
        self.table = table
        self.v6 = table.ip_version == 6
        self.name = f"{'ip6tables' if self.v6 else 'iptables'}-{table.table}"

    def wanted(self, plan: Plan):
        st, t = plan.state, self.table.table
        chains, hooks = (st.chains6, st.hooks6) if self.v6 else (st.chains, st.hooks)
        return chains.get(t, {}), tuple(h for h in hooks if h.table == t)

    def set_desired(self, wanted) -> None:
        self.table.set_desired(wanted[0], list(wanted[1]))

    def apply(self, full: bool) -> ApplyResult:
        try:
            ch = self.table.apply(full=full)
        except CommandError as e:
            if not self.v6:
                raise
            # A node without IPv6 (ipv6.disable=1) has no ip6tables tables: say so, and
            # let everything else be programmed.
            return ApplyResult(failed=True, problems={
                "ip6tables": f"ip6tables {self.table.table} table cannot be programmed: {e}"})
        return ApplyResult(_changes(self.name.replace("-", "_"), ch))


class VxlanDriver(SinglePhase):
    """vxlan.calico (version 4) or vxlan-v6.calico (version 6): present while a vxlan pool
    of that IP version gives this node a block, removed otherwise (also a device an earlier
    agent left behind when the mode changed across a restart: the first pass is always due)."""

    def __init__(self, netns: str | None, uplink: str, version: int = 4):
        self.dev = VxlanDevice(netns, version=version)
        self.uplink = uplink
        self.version = version
        self.name = "vxlan" if version == 4 else "vxlan6"
        self._want: VxlanWanted | None = None

    def wanted(self, plan: Plan):
        return plan.vxlan if self.version == 4 else plan.vxlan6

    def set_desired(self, wanted) -> None:
        self._want = wanted
        if wanted is not None:
            self.dev.set_desired(wanted.addr, wanted.mac, self.uplink, fdb=wanted.fdb, neighbors=wanted.neighbors)

    def apply(self, full: bool) -> ApplyResult:
        if self._want is None:
            return ApplyResult({self.name: "removed"} if self.dev.remove() else {})
        ch = self.dev.apply()
        return ApplyResult({self.name: "; ".join(ch)} if ch else {})


class IpipDriver(SinglePhase):
    """tunl0's address.  Without the ipip kernel module the pass goes on (a problem is
    reported) and the routes driver leaves out the routes that would need tunl0."""

    name = "ipip"

    def __init__(self, netns: str | None):
        self.dev = IpipDevice(netns)
        self._addr: str | None = None
        self.usable = True  # False while an ipip block is wanted and tunl0 cannot exist

    def wanted(self, plan: Plan):
        return plan.ipip_addr

    def set_desired(self, wanted) -> None:
        self._addr = wanted
        if wanted is not None:
            self.dev.set_desired(wanted)

    def apply(self, full: bool) -> ApplyResult:
        self.usable = True
        if self._addr is None:
            return ApplyResult()
        try:
            ch = self.dev.apply()
        except KernelModuleMissing as e:
            self.usable = False
            return ApplyResult(failed=True, problems={"ipip": (
                f"IPIP pool cannot work on this node: {e}; routes to other nodes' ipip blocks are "
                "not programmed (load the module, or use a vxlan pool)")})
        return ApplyResult({"ipip": "; ".join(ch)} if ch else {})


class RoutesDriver(SinglePhase):
    """Routes of protocol 80 (the agent's).  Runs after the tunnel drivers, whose devices
    its routes name."""

    name = "routes"

    def __init__(self, netns: str | None, ipip: IpipDriver):
        self.routes = RouteDriver(netns)
        self.ipip = ipip

    def wanted(self, plan: Plan):
        if self.ipip.usable:
            return plan.state.routes
        # No tunl0: these routes cannot be installed; leave them out instead of failing
        # them one by one on every pass.
        return frozenset(r for r in plan.state.routes if r.dev != IPIP_DEVICE)

    def set_desired(self, wanted) -> None:
        self.routes.set_desired(wanted)

    def apply(self, full: bool) -> ApplyResult:
        rc = self.routes.apply()
        # a route whose device appears later is retried by the next pass
        return ApplyResult(_changes("routes", rc), failed=bool(rc.failed))
