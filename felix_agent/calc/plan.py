"""What should exist on this node, as one value: `Planner.plan(cluster) -> Plan`.

Pure (no I/O, no logging): the dataplane drivers take their slices of a Plan, and what the
calc has to say about the cluster comes back as data: `Plan.errors` (input it skipped) and
`Plan.warnings` (conditions an operator should hear about, logged by the agent once per
change).  The Planner keeps two caches between passes, both pure: the incremental policy
calc, and the routing part (routes, tunnels, BIRD's config), which depends on nodes,
pools, blocks and peers only and so stands while pods and policies churn (and is
kept node by node: node_routing.py).

Who owns which routes between nodes: the agent (proto 80) for direct and vxlan pools,
BIRD (proto bird) for bgp pools and, when BIRD runs, for ipip pools too (BIRD's kernel
export puts them on tunl0; two writers for one destination would fight).  With BIRD
disabled the agent programs the ipip routes itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from felix_agent.calc import routes as route_calc
from felix_agent.calc.bird_conf import bird_config, password_include, wants_ipv6
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.desired import DesiredState
from felix_agent.calc.filter import CalcConfig, dataplane_state
from felix_agent.calc.flowlog import FlowLogConfig
from felix_agent.calc.incremental import IncrementalCalc
from felix_agent.calc.nat import nat6_state
from felix_agent.calc.node_routing import FullRouting, NodeRouting
from felix_agent.model import DEFAULT_AS

ROUTING_KINDS = ("Node", "IPPool", "BlockAffinity", "BGPPeer")
BIRD_MODES = frozenset({"bgp", "ipip"})  # pool modes whose routes BIRD exchanges


@dataclass(frozen=True)
class PlanConfig:
    node: str
    uplink: str
    node_ip: str = ""  # the uplink's address/prefix: this node's subnet when the datastore has none
    node_ip6: str = ""  # the same for IPv6
    # kubernetes datastore: peers cannot publish VTEPs (read-only RBAC), so derive them
    derive_vteps: bool = False
    bird: bool = True  # BIRD may run (config bird_enabled)
    default_as: int = DEFAULT_AS
    bgp_password_file: str = ""  # the mesh (node-to-node) sessions' password
    secrets_dir: str = ""  # where BIRD's password includes live (named in the config text)
    wl_to_host_action: str = "ACCEPT"
    flow_logs: FlowLogConfig | None = None  # None: no flow-log rules

    @property
    def calc(self) -> CalcConfig:
        return CalcConfig(node_name=self.node, wl_to_host_action=self.wl_to_host_action, flow_logs=self.flow_logs)


@dataclass(frozen=True)
class VxlanWanted:
    addr: str
    mac: str
    fdb: frozenset
    neighbors: frozenset
    version: int = 4  # 4: vxlan.calico over the IPv4 underlay; 6: vxlan-v6.calico over IPv6


@dataclass(frozen=True)
class PlanWarning:
    topic: str  # one per condition: a new text under the same topic is a change worth logging
    message: str
    fields: tuple[tuple[str, str], ...] = ()


@dataclass
class Plan:
    state: DesiredState
    vxlan: VxlanWanted | None = None
    vxlan6: VxlanWanted | None = None  # vxlan-v6.calico
    bird_conf: str | None = None  # None: no BGP pool, BIRD not wanted
    ipip_addr: str | None = None  # tunl0's address (first address of my first ipip block)
    # BIRD include file -> the node-local password file it is made from (paths only)
    bird_secrets: dict[str, str] = field(default_factory=dict)
    modes: tuple[str, ...] = ()  # the enabled pools' modes
    families: tuple[int, ...] = ()  # the enabled pools' IP versions
    errors: list[str] = field(default_factory=list)
    warnings: tuple[PlanWarning, ...] = ()
    check: Cluster | None = None  # a model snapshot to cross-check the policy state against

    @property
    def wants_bird(self) -> bool:
        return bool(BIRD_MODES & set(self.modes))


class Planner:
    def __init__(self, config: PlanConfig):
        self.config = config
        self.calc_config = config.calc
        self.policy_calc = IncrementalCalc(self.calc_config)
        self._routing: tuple[Cluster, tuple[int, ...], Plan] | None = None  # (cluster, versions, plan)
        self.node_routing = node_routing(config)  # the routing calc's per-node parts
        self._stale = False  # set by rebuild() (the dataplane thread), read by plan()

    def plan(self, cluster: Cluster, full: bool = False) -> Plan:
        """full=True (a resync pass): the plan also carries a snapshot of the model, from
        which `cross_check` recomputes the policy state from scratch (on another thread)."""
        if self._stale:
            self.policy_calc, self._stale = IncrementalCalc(self.calc_config), False
            self.node_routing, self._routing = node_routing(self.config), None
        errors: list[str] = []
        state = self.policy_calc.state(cluster, errors)
        key = cluster.versions(*ROUTING_KINDS)
        if self._routing is None or self._routing[0] is not cluster or self._routing[1] != key:
            self._routing = (cluster, key, routing_plan(cluster, self.config, self.node_routing))
        routing = self._routing[2]
        state.routes = routing.state.routes
        add_chains6(state, routing.state)
        return Plan(state=state, vxlan=routing.vxlan, vxlan6=routing.vxlan6, bird_conf=routing.bird_conf,
                    ipip_addr=routing.ipip_addr, bird_secrets=routing.bird_secrets, modes=routing.modes,
                    families=routing.families,
                    errors=errors + routing.errors, warnings=routing.warnings,
                    check=cluster.snapshot() if full else None)

    def rebuild(self) -> None:
        """The next plan() starts the incremental calc afresh (after a failed cross-check)."""
        self._stale = True


def add_chains6(state: DesiredState, routing: DesiredState) -> None:
    """The routing part's ip6tables chains (IPv6 natOutgoing) joined to the policy part's:
    chains are added to their table (a chain both name stays the policy part's, so a policy
    calc that renders the whole IPv6 nat table, floating IPs too, is not cut short), hooks
    appended once each."""
    for table, chains in routing.chains6.items():
        state.chains6 = {**state.chains6, table: {**chains, **state.chains6.get(table, {})}}
    state.hooks6 = state.hooks6 + tuple(h for h in routing.hooks6 if h not in state.hooks6)


def cross_check(plan: Plan, config: CalcConfig, routing: PlanConfig | None = None) -> list[str]:
    """The full calc on the plan's snapshot.  Where the incremental result differs, the
    full one replaces it in `plan`; returns the differing chains and sets (empty: agreed).
    With `routing` (the Planner's config) the routing part is recomputed from scratch and
    compared too ("routing" among the differences)."""
    snapshot, plan.check = plan.check, None
    want = dataplane_state(snapshot, config, [])
    st = plan.state
    bad: list[str] = []
    if routing is not None:
        full = routing_plan(snapshot, routing)
        if _routing_of(full) != _routing_of(plan):
            bad.append("routing")
            plan.vxlan, plan.vxlan6, plan.bird_conf = full.vxlan, full.vxlan6, full.bird_conf
            plan.ipip_addr, plan.bird_secrets, st.routes = full.ipip_addr, full.bird_secrets, full.state.routes
    # ip6tables: only the tables the policy calc renders (the routing part adds IPv6 nat)
    mine6 = {t: st.chains6.get(t, {}) for t in want.chains6}
    if (want.chains, want.hooks, want.ipsets, want.chains6) == (st.chains, st.hooks, st.ipsets, mine6):
        return bad
    differ = sorted({n for n in set(want.ipsets) | set(st.ipsets) if want.ipsets.get(n) != st.ipsets.get(n)} |
                 {f"{'ip6tables ' if v6 else ''}{c}" for v6, (w, h, tables) in enumerate((
                     (want.chains, st.chains, ("filter", "nat")), (want.chains6, mine6, tuple(want.chains6))))
                  for t in tables for c in set(w.get(t, {})) | set(h.get(t, {}))
                  if w.get(t, {}).get(c) != h.get(t, {}).get(c)})
    st.chains, st.hooks, st.ipsets = want.chains, want.hooks, want.ipsets
    st.chains6 = {**st.chains6, **want.chains6}
    return bad + (differ or ["hooks"])


def _routing_of(plan: Plan) -> tuple:
    # (the IPv6 nat chains are made from scratch every pass, from the nodes and pools)
    return plan.state.routes, plan.vxlan, plan.vxlan6, plan.bird_conf, plan.ipip_addr, plan.bird_secrets


def routing_plan(cluster: Cluster, cfg: PlanConfig, kept: NodeRouting | None = None) -> Plan:
    """Routes, tunnels and BIRD's config: the part of a Plan that nodes, pools, blocks and
    peers decide.  `kept`: the per-node parts of the previous passes (node_routing.py),
    brought up to date; without it everything is computed from scratch (the cross-check)."""
    nr: NodeRouting | FullRouting = kept if kept is not None else node_routing(cfg, FullRouting)
    nr.update(cluster)
    errors: list[str] = []
    pools, blocks, nodes, by_node = cluster.pools, cluster.block_affinities, nr.nodes, nr.by_node
    state = DesiredState()
    state.routes = (nr.remote_routes()
                    | route_calc.local_block_routes(nodes, pools, blocks, cfg.node, by_node=by_node))
    enabled = [p for p in pools.values() if not p.disabled]
    plan = Plan(state=state, errors=errors, modes=tuple(sorted({p.mode for p in enabled})),
                families=tuple(sorted({route_calc.version_of(p.cidr) for p in enabled})),
                warnings=off_subnet_warnings(cluster, nr))
    state.chains6, state.hooks6 = nat6_state(pools.values(), nodes.values())
    if "vxlan" in plan.modes:
        for version in (4, 6):
            block = route_calc.tunnel_block(nodes, pools, blocks, cfg.node, "vxlan", by_node, version)
            if block:
                addr, mac = route_calc.vtep_for(cfg.node, block)
                fdb, neigh = nr.vxlan_peers(version)
                wanted = VxlanWanted(addr, mac, fdb, neigh, version)
                if version == 4:
                    plan.vxlan = wanted
                else:
                    plan.vxlan6 = wanted
    if "ipip" in plan.modes:
        block = route_calc.tunnel_block(nodes, pools, blocks, cfg.node, "ipip", by_node)
        if block:
            # Like the VTEP: the block's first address, which IPAM never gives a pod.
            plan.ipip_addr = route_calc.vtep_for(cfg.node, block)[0]
    me = nodes.get(cfg.node)
    if cfg.bird and me is not None and (me.address or me.address6) and plan.wants_bird:
        try:
            # an IPv6-only node has IPv6 sessions only
            sess = nr.sessions(cluster.bgp_peers) if me.address else []
            sess6 = nr.sessions(cluster.bgp_peers, 6) if wants_ipv6(pools.values(), me) else []
            plan.bird_conf = bird_config(nodes, cluster.bgp_peers, pools, blocks, cfg.node,
                                         uplink=cfg.uplink, default_as=cfg.default_as,
                                         mesh_password_file=cfg.bgp_password_file,
                                         secrets_dir=cfg.secrets_dir, sess=sess, by_node=by_node, sess6=sess6,
                                         far=nr.far_nodes())
            plan.bird_secrets = {password_include(cfg.secrets_dir, s.name): s.password_file
                                 for s in sess + sess6 if s.password_file}
        except ValueError as e:
            errors.append(f"BIRD config: {e}")
    if plan.bird_conf is not None:
        state.routes = state.routes - nr.ipip_routes()
    return plan


def node_routing(cfg: PlanConfig, kind=NodeRouting):
    return kind(cfg.node, uplink=cfg.uplink, node_ip=cfg.node_ip, node_ip6=cfg.node_ip6,
                derive_vteps=cfg.derive_vteps, default_as=cfg.default_as, mesh_password_file=cfg.bgp_password_file)


def off_subnet_warnings(cluster: Cluster, nr: NodeRouting | FullRouting) -> tuple[PlanWarning, ...]:
    """Which nodes' pods this node cannot reach because they sit behind a router and their
    pool does not encapsulate.  With explicit BGP peers (a ToR that routes the blocks)
    bgp mode can work across subnets: no warning then."""
    why = {"direct": "direct routes need the next hop on this node's link"}
    if not cluster.bgp_peers:
        why["bgp"] = "BGP routes with a next hop behind a router are not installed"
    out = []
    for mode, reason in why.items():
        far = nr.off_subnet_nodes(mode)
        if far:
            out.append(PlanWarning(
                f"off-subnet/{mode}",
                "pods on nodes in another subnet are unreachable in this pool mode; "
                "use vxlan or ipip (crossSubnet) for them",
                (("mode", mode), ("nodes", ",".join(far)), ("reason", reason))))
    return tuple(out)

