"""Glue between the pure calc and the dataplane drivers.

`Dataplane.calculate(cluster)` is pure: it turns the model into a Plan (chains, hooks,
ipsets, routes, the VXLAN device's wanted state and BIRD's config text).
`Dataplane.apply(plan)` runs on the agent's single dataplane worker thread and calls the
drivers in the order that keeps every reference valid:
    ipsets (create/update) -> iptables filter, nat, raw; ip6tables raw -> ipsets (delete stale)
    -> vxlan device, ipip device -> routes -> BIRD
Full passes also reset route_localnet on cali veths (dataplane/sysctls.py).

Who owns which routes between nodes: the agent (proto 80) for direct and vxlan pools,
BIRD (proto bird) for bgp pools and, when BIRD runs, for ipip pools too (BIRD's kernel
export puts them on tunl0; two writers for one destination would fight).  With BIRD
disabled the agent programs the ipip routes itself.

A missing kernel module (no ipip) does not stop the pass: everything else is still
programmed, the error is logged once per change and kept in `Dataplane.problems`, which
the agent shows as last_error in its status.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from felix_agent import metrics
from felix_agent.dataplane.bird import BirdDaemon
from felix_agent.calc.bird_conf import bird_config, password_include, sessions
from felix_agent.dataplane.bird_secrets import md5_counters, write_includes
from felix_agent.calc import routes as route_calc
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.desired import DesiredState
from felix_agent.calc.filter import CalcConfig, dataplane_state
from felix_agent.dataplane.backend import BackendError, detect, require_backend
from felix_agent.dataplane.cmd import CommandError
from felix_agent.dataplane.forwarding import Forwarding
from felix_agent.calc.incremental import IncrementalCalc
from felix_agent.dataplane.ipsets import IpsetDriver
from felix_agent.dataplane.iptables import IptablesTable
from felix_agent.dataplane.routes import RouteDriver
from felix_agent.dataplane.sysctls import reset_route_localnet
from felix_agent.dataplane.tunnels import IpipDevice, KernelModuleMissing, VxlanDevice
from felix_agent.logs import kv
from felix_agent.model import DEFAULT_AS

log = logging.getLogger("tortie.dataplane")
TABLES = ("filter", "nat", "raw")
TABLES6 = ("raw",)  # ip6tables: the loopback guard only (the policy calc is IPv4-only)
ROUTING_KINDS = ("Node", "IPPool", "BlockAffinity", "BGPPeer")
_NOTHING = object()


@dataclass
class VxlanWanted:
    addr: str
    mac: str
    fdb: frozenset
    neighbors: frozenset


@dataclass
class Plan:
    state: DesiredState
    vxlan: VxlanWanted | None = None
    bird_conf: str | None = None  # None: no BGP pool, BIRD not wanted
    ipip_addr: str | None = None  # tunl0's address (first address of my first ipip block)
    # BIRD include file -> the node-local password file it is made from (paths only)
    bird_secrets: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    check: Cluster | None = None  # a model snapshot to cross-check the policy state against


class Dataplane:
    def __init__(self, node_name: str, uplink: str, *, netns: str | None = None,
                 iptables_backend: str = "auto", wl_to_host_action: str = "ACCEPT",
                 run_dir: str = "/var/run/tortie", bird: bool = True,
                 bird_bin: str = "bird", birdc_bin: str = "birdc", default_as: int = DEFAULT_AS,
                 derive_vteps: bool = False, bgp_password_file: str = "", node_ip: str = "",
                 ensure_forwarding: bool = True):
        self.node = node_name
        self.uplink = uplink
        self.node_ip = node_ip  # the uplink's address/prefix: my subnet when the datastore has none
        self.netns = netns
        self.default_as = default_as
        # kubernetes datastore: peers cannot publish VTEPs (read-only RBAC), so derive them
        self.derive_vteps = derive_vteps
        det = detect(netns, configured=iptables_backend)
        self.backend = det.backend
        log.info("iptables backend chosen", extra=kv(backend=det.backend, reason=det.reason))
        self.tables = {t: IptablesTable(t, det.backend, netns) for t in TABLES}
        self.tables6: dict[str, IptablesTable] = {}
        try:
            require_backend(det.backend, 6)
            self.tables6 = {t: IptablesTable(t, det.backend, netns, ip_version=6) for t in TABLES6}
        except BackendError as e:
            log.warning("no ip6tables: the IPv6 loopback guard is not programmed (the kernel still "
                        "drops ::1 from pods)", extra=kv(error=e))
        self.ipsets = IpsetDriver(netns)
        self.routes = RouteDriver(netns)
        self.vxlan = VxlanDevice(netns)
        # unknown at start: a device an earlier agent made for a vxlan pool that is gone
        # now (the mode changed across a restart) is removed by the first pass
        self._vxlan_present = True
        self.ipip = IpipDevice(netns)
        self.forwarding = Forwarding(netns, ensure=ensure_forwarding)
        self._first_pass_done = False
        # driver -> error text for problems that degrade the node without failing the pass
        # (a missing kernel module); read by the agent's status as last_error.
        self.problems: dict[str, str] = {}
        self._applied: dict[str, object] = {}  # driver -> desired state it last applied cleanly
        self._warned_off_subnet: dict[str, tuple[str, ...]] = {}
        self.bird_enabled = bird
        self._bird_seen = False  # bird ran (or was started) under this process
        os.makedirs(run_dir, exist_ok=True)
        self.bird = BirdDaemon(os.path.join(run_dir, "bird"), netns, bird_bin=bird_bin, birdc_bin=birdc_bin)
        self.bgp_password_file = bgp_password_file  # the mesh (node-to-node) sessions' password
        self.secrets_dir = os.path.join(self.bird.run_dir, "secrets")
        self._passworded: set[str] = set()  # BGP protocols with a password, for status hints
        self.calc_cfg = CalcConfig(node_name=node_name, wl_to_host_action=wl_to_host_action)
        self.modes: tuple[str, ...] = ()
        self._routing: tuple[Cluster, tuple[int, ...], Plan] | None = None  # (cluster, versions, plan)
        self.policy_calc = IncrementalCalc(self.calc_cfg)
        self._calc_mismatch = False  # set by the cross-check (worker thread), read by calculate

    # -- pure ---------------------------------------------------------------------------

    def calculate(self, cluster: Cluster, full: bool = False) -> Plan:
        """full=True (a resync pass): the plan also carries a snapshot of the model, from
        which apply() recomputes the policy state from scratch on the worker thread, as a
        cross-check of the incremental calc."""
        errors: list[str] = []
        if self._calc_mismatch:
            self.policy_calc, self._calc_mismatch = IncrementalCalc(self.calc_cfg), False
        state = self.policy_calc.state(cluster, errors)
        # Routes, tunnels and BIRD depend on nodes, pools, blocks and peers only: most events
        # (pods, policies) leave them as they were, so the last result stands.
        key = cluster.versions(*ROUTING_KINDS)
        if self._routing is None or self._routing[0] is not cluster or self._routing[1] != key:
            self._routing = (cluster, key, self._routing_plan(cluster))
        routing = self._routing[2]
        state.routes = routing.state.routes
        errors.extend(routing.errors)
        return Plan(state=state, vxlan=routing.vxlan, bird_conf=routing.bird_conf,
                    ipip_addr=routing.ipip_addr, bird_secrets=routing.bird_secrets, errors=errors,
                    check=cluster.snapshot() if full else None)

    def _cross_check(self, plan: Plan) -> None:
        """The full calc on the plan's snapshot; where the incremental result differs, the
        full one is programmed, the difference logged, and the incremental calc rebuilt."""
        want = dataplane_state(plan.check, self.calc_cfg, [])
        plan.check = None
        st = plan.state
        if (want.chains, want.hooks, want.ipsets) != (st.chains, st.hooks, st.ipsets):
            bad = sorted({n for n in set(want.ipsets) | set(st.ipsets) if want.ipsets.get(n) != st.ipsets.get(n)} |
                         {c for t in ("filter", "nat") for c in set(want.chains.get(t, {})) | set(st.chains.get(t, {}))
                          if want.chains.get(t, {}).get(c) != st.chains.get(t, {}).get(c)})
            log.error("incremental calc differs from the full calc; programming the full result",
                      extra=kv(differs=",".join(bad[:10])))
            metrics.ERRORS.labels(kind="calc").inc()
            st.chains, st.hooks, st.ipsets = want.chains, want.hooks, want.ipsets
            self._calc_mismatch = True

    def _routing_plan(self, cluster: Cluster) -> Plan:
        errors: list[str] = []
        nodes, pools, blocks = cluster.nodes, cluster.pools, cluster.block_affinities
        nodes = route_calc.with_own_prefix(nodes, self.node, self.node_ip)
        if self.derive_vteps and any(p.mode == "vxlan" and not p.disabled for p in pools.values()):
            nodes = {n.name: n for n in route_calc.with_derived_vteps(nodes, pools, blocks)}
        state = DesiredState()
        state.routes = (route_calc.remote_routes(nodes, pools, blocks, self.node, uplink=self.uplink)
                        | route_calc.local_block_routes(nodes, pools, blocks, self.node))
        plan = Plan(state=state, errors=errors)
        enabled = [p for p in pools.values() if not p.disabled]
        self.modes = tuple(sorted({p.mode for p in enabled}))
        if any(p.mode == "vxlan" for p in enabled):
            block = route_calc.tunnel_block(nodes, pools, blocks, self.node, "vxlan")
            if block:
                addr, mac = route_calc.vtep_for(self.node, block)
                fdb, neigh = route_calc.vxlan_peers(nodes, pools, self.node)
                plan.vxlan = VxlanWanted(addr, mac, fdb, neigh)
        if any(p.mode == "ipip" for p in enabled):
            block = route_calc.tunnel_block(nodes, pools, blocks, self.node, "ipip")
            if block:
                # Like the VTEP: the block's first address, which IPAM never gives a pod.
                plan.ipip_addr = route_calc.vtep_for(self.node, block)[0]
        me = nodes.get(self.node)
        if self.bird_enabled and me is not None and me.address and any(p.mode in ("bgp", "ipip") for p in enabled):
            try:
                plan.bird_conf = bird_config(nodes, cluster.bgp_peers, pools, blocks, self.node,
                                             uplink=self.uplink, default_as=self.default_as,
                                             mesh_password_file=self.bgp_password_file,
                                             secrets_dir=self.secrets_dir)
                plan.bird_secrets = {
                    password_include(self.secrets_dir, s.name): s.password_file
                    for s in sessions(nodes, cluster.bgp_peers, self.node, default_as=self.default_as,
                                      mesh_password_file=self.bgp_password_file) if s.password_file}
            except ValueError as e:
                errors.append(f"BIRD config: {e}")
        if plan.bird_conf is not None:
            state.routes = frozenset(r for r in state.routes if not _ipip_remote(r, pools))
        self._warn_off_subnet(cluster, nodes)
        return plan

    def _warn_off_subnet(self, cluster: Cluster, nodes) -> None:
        """Say (once per change) which nodes' pods this node cannot reach because they sit
        behind a router and their pool does not encapsulate.  With explicit BGP peers
        (a ToR that routes the blocks) bgp mode can work across subnets: no warning then."""
        why = {"direct": "direct routes need the next hop on this node's link"}
        if not cluster.bgp_peers:
            why["bgp"] = "BGP routes with a next hop behind a router are not installed"
        for mode in ("direct", "bgp"):
            far = (route_calc.off_subnet_nodes(nodes, cluster.pools, cluster.block_affinities,
                                               self.node, mode) if mode in why else ())
            if far != self._warned_off_subnet.get(mode, ()):
                self._warned_off_subnet[mode] = far
                if far:
                    log.warning("pods on nodes in another subnet are unreachable in this pool mode; "
                                "use vxlan or ipip (crossSubnet) for them",
                                extra=kv(mode=mode, nodes=",".join(far), reason=why[mode]))

    # -- kernel (one worker thread) ---------------------------------------------------

    def apply(self, plan: Plan, full: bool = True) -> dict:
        """Reconcile the kernel with `plan`.  full=False (between resyncs) skips every
        driver whose desired state equals what it last applied successfully: a pod ADD
        changes only the filter table and its sets, so nat, routes and tunnels are not read
        back.  Full passes, on the resync timer, read everything and repair drift."""
        summary: dict = {}
        if plan.check is not None:
            self._cross_check(plan)
        st = plan.state

        def timed(name, fn):
            t0 = time.monotonic()
            try:
                return fn()
            finally:
                metrics.APPLY_SECONDS.labels(driver=name).observe(time.monotonic() - t0)

        def due(name: str, desired) -> bool:
            return full or self._applied.get(name, _NOTHING) != desired

        def done(name: str, desired) -> None:
            self._applied[name] = desired

        if full:
            self._applied.clear()  # a failure below must not leave stale "already applied" marks
        # the first pass need not be a full one, and what it finds matters at once
        first, self._first_pass_done = not self._first_pass_done, True
        if full or first:
            self._apply_forwarding(summary)
        ipsets_due = due("ipsets", st.ipsets)
        if ipsets_due:
            self.ipsets.set_desired(st.ipsets)
            up = timed("ipsets", lambda: self.ipsets.apply_updates(full))
            if up:
                summary["ipsets"] = str(up)
        for t in TABLES:
            want = (st.chains.get(t, {}), tuple(h for h in st.hooks if h.table == t))
            if due(f"iptables-{t}", want):
                self.tables[t].set_desired(want[0], list(want[1]))
                # Between resyncs the table plans against its own view of what it wrote
                # (no iptables-save); a full pass reads the table and repairs drift.
                ch = timed(f"iptables-{t}", lambda t=t: self.tables[t].apply(full=full))
                if ch:
                    summary[f"iptables_{t}"] = str(ch)
                done(f"iptables-{t}", want)
        for t, table in self.tables6.items():
            want6 = (st.chains6.get(t, {}), tuple(h for h in st.hooks6 if h.table == t))
            if due(f"ip6tables-{t}", want6):
                table.set_desired(want6[0], list(want6[1]))
                try:
                    ch = timed(f"ip6tables-{t}", lambda table=table: table.apply(full=full))
                except CommandError as e:
                    # A node without IPv6 (ipv6.disable=1) has no ip6tables tables: say so,
                    # program everything else.
                    msg = f"ip6tables {t} table cannot be programmed: {e}"
                    if self.problems.get("ip6tables") != msg:
                        log.error("IPv6 loopback guard unavailable", extra=kv(error=msg))
                    self.problems["ip6tables"] = msg
                    continue
                self.problems.pop("ip6tables", None)
                if ch:
                    summary[f"ip6tables_{t}"] = str(ch)
                done(f"ip6tables-{t}", want6)
        if full:
            # Veths wired by older versions had route_localnet=1 (calc/raw.py); the guard
            # drops those packets anyway, this takes away the second way in.
            reset = timed("sysctls", lambda: reset_route_localnet(self.netns))
            if reset:
                log.warning("route_localnet was on for pod interfaces; turned off",
                            extra=kv(interfaces=",".join(reset)))
                summary["route_localnet_reset"] = len(reset)
        if ipsets_due:
            dels = timed("ipsets", lambda: self.ipsets.apply_deletions(full))
            if dels:
                summary["ipsets_deleted"] = str(dels)
            if not (getattr(up, "failed", None) or getattr(dels, "failed", None)):
                done("ipsets", st.ipsets)
        if plan.vxlan is not None:
            if due("vxlan", plan.vxlan):
                v = plan.vxlan
                self.vxlan.set_desired(v.addr, v.mac, self.uplink, fdb=v.fdb, neighbors=v.neighbors)
                ch = timed("vxlan", self.vxlan.apply)
                self._vxlan_present = True
                if ch:
                    summary["vxlan"] = "; ".join(ch)
                done("vxlan", plan.vxlan)
        elif self._vxlan_present:
            if self.vxlan.remove():
                summary["vxlan"] = "removed"
            self._vxlan_present = False
            self._applied.pop("vxlan", None)
        routes = st.routes
        if plan.ipip_addr is not None:
            if not self._apply_ipip(plan.ipip_addr, summary, timed):
                # No tunl0: these routes cannot be installed; leave them out instead of
                # failing them one by one on every pass.
                routes = frozenset(r for r in routes if r.dev != route_calc.IPIP_DEVICE)
        else:
            self.problems.pop("ipip", None)
        if due("routes", routes):
            self.routes.set_desired(routes)
            rc = timed("routes", self.routes.apply)
            if rc:
                summary["routes"] = str(rc)
            if not getattr(rc, "failed", None):  # a device that appears later needs the next pass
                done("routes", routes)
        # Between resyncs bird is left alone while its config stands (checking that it
        # runs reads three files a pass); a full pass restarts it if it died.
        if plan.bird_conf is not None and due("bird", plan.bird_conf):
            # Password files are re-read on every full pass (a rotated password lands
            # within a resync); a changed include makes BIRD re-read its config.
            secrets_changed, secret_problems = write_includes(plan.bird_secrets, self.secrets_dir)
            self._passworded = {os.path.basename(p)[:-len(".conf")] for p in plan.bird_secrets}
            if secret_problems:
                msg = "BGP password: " + "; ".join(secret_problems.values())
                if self.problems.get("bgp_password") != msg:
                    log.error("BGP password unusable", extra=kv(error=msg))
                self.problems["bgp_password"] = msg
            else:
                self.problems.pop("bgp_password", None)
            outcome = timed("bird", lambda: self.bird.ensure(plan.bird_conf, reload=secrets_changed))
            if outcome != "unchanged":
                summary["bird"] = outcome
            if outcome == "started" and self._bird_seen:
                metrics.BIRD_RESTARTS.inc()
                log.warning("bird was not running; restarted it")
            self._bird_seen = True
            done("bird", plan.bird_conf)
        elif (full or first) and plan.bird_conf is None and not {"bgp", "ipip"} & set(self.modes) and self.bird.running():
            # no pool wants BGP any more (a switch to vxlan/direct): a bird left running
            # would keep announcing blocks and installing routes beside the new ones
            self.bird.stop()
            summary["bird"] = "stopped (no bgp or ipip pool)"
        metrics.IPSETS.set(len(st.ipsets))
        metrics.IPSET_MEMBERS.set(sum(len(s.members) for s in st.ipsets.values()))
        for t in TABLES:
            metrics.IPTABLES_RULES.labels(table=t).set(sum(len(r) for r in st.chains.get(t, {}).values()))
        return summary

    def bird_died(self) -> bool:
        """True (once) when bird was running under this agent and its process is gone:
        the next pass starts it again.  Called by the agent's loop every second, between
        passes (the pass thread owns _applied while it runs)."""
        if "bird" not in self._applied or self.bird.running():
            return False
        self._applied.pop("bird", None)
        return True

    def _apply_forwarding(self, summary: dict) -> None:
        """Checked on every full pass (something else may turn it off again)."""
        changed, problem = self.forwarding.apply()
        if changed:
            summary["forwarding"] = "net.ipv4.ip_forward=1"
        if problem:
            if self.problems.get("forwarding") != problem:
                log.error("node does not forward", extra=kv(error=problem))
            self.problems["forwarding"] = problem
        elif self.problems.pop("forwarding", None) is not None:
            log.info("node forwards again")

    def _apply_ipip(self, addr: str, summary: dict, timed) -> bool:
        """Put `addr` on tunl0; False (problem recorded, logged once) when the kernel has
        no ipip module."""
        self.ipip.set_desired(addr)
        try:
            ch = timed("ipip", self.ipip.apply)
        except KernelModuleMissing as e:
            msg = (f"IPIP pool cannot work on this node: {e}; routes to other nodes' ipip "
                   "blocks are not programmed (load the module, or use a vxlan pool)")
            if self.problems.get("ipip") != msg:
                log.error("ipip tunnel unavailable", extra=kv(error=msg, module=e.module))
            self.problems["ipip"] = msg
            return False
        if "ipip" in self.problems:
            log.info("ipip tunnel available again")
            self.problems.pop("ipip")
        if ch:
            summary["ipip"] = "; ".join(ch)
        return True

    def bgp_status(self) -> list[dict]:
        if not self.bird.running():
            return []
        try:
            rows = self.bird.protocols()
        except Exception as e:  # birdc unreachable mid-restart: report, do not fail status
            return [{"name": "bird", "state": "unknown", "info": str(e)}]
        down = [r for r in rows if r["name"] in self._passworded and not r["info"].startswith("Established")]
        if down:
            # With TCP MD5 the kernel drops the peer's segments that fail the check before
            # BIRD sees them, so BIRD can only say it gets no answer: the counters say why.
            c = md5_counters() if self.netns is None else {}
            why = (f"TCP MD5 password set; kernel: {c.get('TCPMD5Failure', 0)} segments with a wrong "
                   f"signature (the peer's password differs), {c.get('TCPMD5NotFound', 0)} without one "
                   "(the peer has no password)")
            for r in down:
                r["info"] = f"{r['info']} ({why})".strip()
        return rows


def _ipip_remote(r, pools) -> bool:
    """A unicast route to a block of an ipip pool (BIRD's to program when it runs)."""
    if r.type != "unicast":
        return False
    pool = route_calc.pool_for(r.dst, pools)
    return pool is not None and pool.mode == "ipip"
