"""The apply barrier: one pass reconciles the kernel with a whole Plan, driver by driver.

`Dataplane.calculate(cluster)` asks the pure Planner (calc/plan.py) for a Plan;
`Dataplane.apply(plan)` runs on the agent's single dataplane worker thread and calls
every driver (driver.py's contract) in the order of `Dataplane.drivers`, which keeps every
reference valid:
    sysctls -> ipsets (create/update) -> iptables filter, nat, raw -> ip6tables filter, nat, raw
    -> vxlan, vxlan6 -> ipip -> routes -> BIRD, then the second phase in reverse: ipsets (delete)
A driver is skipped between resyncs when its slice of the plan equals what it last
applied cleanly (a pod ADD changes only the filter table and its sets, so nat, routes and
tunnels are not read back); full passes, on the resync timer, run and read everything.

A degraded part (no ipip module, no IPv6, forwarding refused, an unusable BGP password)
does not stop the pass: the driver reports a problem, logged once per change and kept in
`Dataplane.problems`, which the agent shows as last_error.
"""
from __future__ import annotations

import logging
import os
import time

from felix_agent import metrics
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.flowlog import FlowLogConfig
from felix_agent.calc.plan import Plan, PlanConfig, Planner, PlanWarning, cross_check
from felix_agent.dataplane.backend import BackendError, detect, require_backend
from felix_agent.dataplane.bird import BirdDaemon
from felix_agent.dataplane.bird_driver import BirdDriver
from felix_agent.dataplane.driver import ApplyResult, Driver
from felix_agent.dataplane.drivers import IpipDriver, IpsetsDriver, IptablesDriver, RoutesDriver, VxlanDriver
from felix_agent.dataplane.iptables import IptablesTable
from felix_agent.dataplane.sysctls import SysctlDriver
from felix_agent.logs import kv
from felix_agent.model import DEFAULT_AS

log = logging.getLogger("tortie.dataplane")
TABLES = ("filter", "nat", "raw")
TABLES6 = ("filter", "nat", "raw")  # ip6tables: policy, natOutgoing for IPv6 pools (calc/nat.py), the loopback guard
_NOTHING = object()


class Barrier:
    """Runs `drivers` in their order for one pass (see the module's docstring)."""

    def __init__(self, drivers: list[Driver]):
        self.drivers = drivers
        self._applied: dict[str, object] = {}  # driver -> the slice it last applied cleanly
        self._problems: dict[str, dict[str, str]] = {}  # driver -> its standing problems

    @property
    def problems(self) -> dict[str, str]:
        return {k: v for p in self._problems.values() for k, v in p.items()}

    def apply(self, plan: Plan, full: bool = True) -> dict:
        """Reconcile the kernel with `plan`; returns what changed (empty: nothing)."""
        if full:
            self._applied.clear()  # a failure below must not leave stale "already applied" marks
        summary: dict = {}
        ran: list[Driver] = []
        for d in self.drivers:
            want = d.wanted(plan)
            if not full and self._applied.get(d.name, _NOTHING) == want:
                continue
            d.set_desired(want)
            res = self._run(d, d.apply, full, summary)
            self._set_problems(d.name, res.problems)
            if not res.failed:
                self._applied[d.name] = want
            ran.append(d)
        for d in reversed(ran):
            res = self._run(d, d.apply_removals, full, summary)
            if res.failed:
                self._applied.pop(d.name, None)
        return summary

    @staticmethod
    def _run(d: Driver, step, full: bool, summary: dict) -> ApplyResult:
        t0 = time.monotonic()
        try:
            res = step(full)
        finally:
            metrics.APPLY_SECONDS.labels(driver=d.name).observe(time.monotonic() - t0)
        summary.update(res.changes)
        return res

    def _set_problems(self, driver: str, now: dict[str, str]) -> None:
        before = self._problems.get(driver, {})
        for key, why in now.items():
            if before.get(key) != why:
                log.error("dataplane degraded", extra=kv(problem=key, driver=driver, error=why))
        for key in before.keys() - now.keys():
            log.info("dataplane problem cleared", extra=kv(problem=key, driver=driver))
        self._problems[driver] = now

    def applied(self, name: str) -> bool:
        return name in self._applied

    def forget(self, name: str) -> None:
        """The next pass runs driver `name` even if its slice does not change."""
        self._applied.pop(name, None)


class Dataplane:
    def __init__(self, node_name: str, uplink: str, *, netns: str | None = None,
                 iptables_backend: str = "auto", wl_to_host_action: str = "ACCEPT",
                 run_dir: str = "/var/run/tortie", bird: bool = True,
                 bird_bin: str = "bird", birdc_bin: str = "birdc", default_as: int = DEFAULT_AS,
                 derive_vteps: bool = False, bgp_password_file: str = "", node_ip: str = "",
                 ensure_forwarding: bool = True, node_ip6: str = "",
                 flow_logs: FlowLogConfig | None = None):
        det = detect(netns, configured=iptables_backend)
        self.backend = det.backend
        log.info("iptables backend chosen", extra=kv(backend=det.backend, reason=det.reason))
        self.tables = {t: IptablesTable(t, det.backend, netns) for t in TABLES}
        tables6: dict[str, IptablesTable] = {}
        try:
            require_backend(det.backend, 6)
            tables6 = {t: IptablesTable(t, det.backend, netns, ip_version=6) for t in TABLES6}
        except BackendError as e:
            log.warning("no ip6tables: IPv6 policy and the IPv6 loopback guard are not programmed",
                        extra=kv(error=e))
        os.makedirs(run_dir, exist_ok=True)
        self.bird = BirdDriver(BirdDaemon(os.path.join(run_dir, "bird"), netns, bird_bin=bird_bin,
                                          birdc_bin=birdc_bin), netns)
        ipip = IpipDriver(netns)
        # The order of a pass (the second phase runs backwards).  A new kind of kernel
        # object is a driver.Driver and one entry here.
        self.barrier = Barrier([
            SysctlDriver(netns, ensure_forwarding=ensure_forwarding),
            IpsetsDriver(netns),
            *(IptablesDriver(t) for t in self.tables.values()),
            *(IptablesDriver(t) for t in tables6.values()),
            VxlanDriver(netns, uplink),
            VxlanDriver(netns, uplink, version=6),
            ipip,
            RoutesDriver(netns, ipip),
            self.bird,
        ])
        self.planner = Planner(PlanConfig(
            node=node_name, uplink=uplink, node_ip=node_ip, node_ip6=node_ip6, derive_vteps=derive_vteps, bird=bird,
            default_as=default_as, bgp_password_file=bgp_password_file,
            secrets_dir=self.bird.secrets_dir, wl_to_host_action=wl_to_host_action, flow_logs=flow_logs))
        self.modes: tuple[str, ...] = ()
        self._warned: dict[str, PlanWarning] = {}

    @property
    def problems(self) -> dict[str, str]:
        """Conditions that degrade the node without failing a pass; read by the agent's status."""
        return self.barrier.problems

    def apply(self, plan: Plan, full: bool = True) -> dict:
        """Reconcile the kernel with `plan` (the worker thread); returns what changed."""
        if plan.check is not None:
            self._cross_check(plan)
        summary = self.barrier.apply(plan, full)
        self._update_gauges(plan)
        return summary

    def calculate(self, cluster: Cluster, full: bool = False) -> Plan:
        """The Plan for `cluster` (pure); full=True also carries a model snapshot for the
        cross-check apply() runs.  The plan's warnings are logged once per change."""
        plan = self.planner.plan(cluster, full)
        self.modes = plan.modes
        self._log_warnings(plan.warnings)
        return plan

    def bird_died(self) -> bool:
        """True (once) when BIRD was running under this agent and its process is gone: the
        next pass starts it again.  Called by the agent's loop every second, between
        passes (the pass thread owns _applied while it runs)."""
        if self.barrier.applied(self.bird.name) and self.bird.died():
            self.barrier.forget(self.bird.name)
            return True
        return False

    def bgp_status(self) -> list[dict]:
        return self.bird.status()

    # -- helpers --

    def _cross_check(self, plan: Plan) -> None:
        """Where the incremental calc differs from the full one, the full result is
        programmed, the difference logged, and the incremental calc rebuilt."""
        bad = cross_check(plan, self.planner.calc_config, self.planner.config)
        if bad:
            log.error("incremental calc differs from the full calc; programming the full result",
                      extra=kv(differs=",".join(bad[:10])))
            metrics.ERRORS.labels(kind="calc").inc()
            self.planner.rebuild()

    def _log_warnings(self, warnings: tuple[PlanWarning, ...]) -> None:
        now = {w.topic: w for w in warnings}
        for topic, w in now.items():
            if self._warned.get(topic) != w:
                log.warning(w.message, extra=kv(**dict(w.fields)))
        self._warned = now

    def _update_gauges(self, plan: Plan) -> None:
        st = plan.state
        metrics.IPSETS.set(len(st.ipsets))
        metrics.IPSET_MEMBERS.set(sum(len(s.members) for s in st.ipsets.values()))
        for t in TABLES:
            metrics.IPTABLES_RULES.labels(table=t).set(sum(len(r) for r in st.chains.get(t, {}).values()))
