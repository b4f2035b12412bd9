"""The whole policy calculation for one node: cluster model -> desired chains and ipsets.

    dataplane_state(cluster, config) -> DesiredState   (routes left empty: calc/routes.py)

filter:  INPUT   -> cali-INPUT   -> (from cali+) cali-wl-to-host -> cali-from-wl-dispatch,
                                    then the configured workload-to-host action
         FORWARD -> cali-FORWARD -> cali-from-wl-dispatch -> cali-fw-<iface> -> cali-co-<id> (Admin)
                                                                              cali-po-<id>
                                                                              cali-co-<id> (Baseline)
                                 -> cali-to-wl-dispatch   -> cali-tw-<iface> -> cali-ci-<id>, cali-pi-<id>, ...
                    (workload traffic both allowed: marked FORWARD_MARK, returned)
                 ... other writers' rules (kube-proxy's KUBE-SERVICES REJECT) ...
                 last rule: -> cali-FORWARD-accept: ACCEPT if marked
         OUTPUT  -> cali-OUTPUT  (empty: the node may always reach its own pods)
nat:     see calc/nat.py
raw:     PREROUTING -> cali-PREROUTING: the loopback guard (calc/raw.py), IPv4 and IPv6
Only this node's endpoints get endpoint chains; the ipsets hold pods of every node.

The filter table exists twice, from the one model: iptables (IPv4, sets cali40...) and
ip6tables (IPv6, sets cali60...), with the same chain names and layout.  The endpoint
chains are the same text in both; the policy chains differ only in the sets they name and
in ipBlocks, each kept in its own family (calc/policy.py).  IPv6 adds to cali-INPUT the
ICMPv6 a pod needs from its router before any policy (as Calico does): neighbour
solicitation and advertisement (the pod resolving its gateway, and answering the node's
questions), router solicitation and multicast listener messages.  These are link-local
(they never reach FORWARD), and conntrack gives ND no state (it would match INVALID), so
they come first.
Policy chains (NetworkPolicy and cluster policy) exist once per policy that selects at
least one local endpoint; calc/endpoints.py orders the tiers.

A pod scheduled to this node gets its chains BEFORE its CNI ADD, under the interface name
the plugin will give it (podnet.naming): nothing in the filter table depends on its
address (calc/dispatch.py), so the ADD only adds the address to ipsets, and the pod is
protected from its first packet without an iptables-restore on the ADD's path.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from podnet.naming import host_iface_name

from felix_agent.calc.cluster import Cluster
from felix_agent.calc.desired import DesiredState, FlowRule, Hook, IpSet
from felix_agent.calc.dispatch import dispatch_chains, sources_set
from felix_agent.calc.endpoints import EndpointPolicies, endpoint_chains
from felix_agent.calc.flowlog import FlowLogConfig, logged_endpoint_chain, logged_policy, policy_name
from felix_agent.calc.ipsets import NodeSet, SetSpec, desired_ipset, node_members
from felix_agent.calc.names import (
    CLEAR_FORWARD_MARK,
    FILTER_FORWARD,
    FILTER_FORWARD_ACCEPT,
    FILTER_INPUT,
    FILTER_OUTPUT,
    FROM_WL_DISPATCH,
    IF_FORWARDED,
    NAT_OUTPUT,
    NAT_POSTROUTING,
    NAT_PREROUTING,
    SET_FORWARD_MARK,
    TO_WL_DISPATCH,
    WL_IFACE_WILDCARD,
    WL_TO_HOST,
    from_wl_chain,
    to_wl_chain,
)
from felix_agent.calc.nat import nat_chains, pool_sets
from felix_agent.calc.policy import PolicyChains, policy_chains
from felix_agent.calc.raw import HOOKS as RAW_HOOKS
from felix_agent.calc.raw import raw_chains
from felix_agent.calc.rule_text import rule
from felix_agent.calc.selectors import FAMILIES, PeerSelector, SelectorIndex
from felix_agent.calc.tier_policy import subject_selector, tier_policy_chains
from felix_agent.model import ClusterPolicy, Endpoint, NetworkPolicy

WL_TO_HOST_ACTIONS = ("ACCEPT", "DROP")
# cali + 1..11 characters: the kernel's 15-character limit; Calico's are cali + 11 hex.
WL_IFACE_RE = re.compile(r"^cali[A-Za-z0-9_.-]{1,11}$")

FILTER_HOOKS = (
    Hook("filter", "INPUT", FILTER_INPUT),
    Hook("filter", "FORWARD", FILTER_FORWARD),
    Hook("filter", "FORWARD", FILTER_FORWARD_ACCEPT, position="bottom"),
    Hook("filter", "OUTPUT", FILTER_OUTPUT),
)
HOOKS = (
    *FILTER_HOOKS,
    Hook("nat", "PREROUTING", NAT_PREROUTING),
    Hook("nat", "OUTPUT", NAT_OUTPUT),
    Hook("nat", "POSTROUTING", NAT_POSTROUTING),
    *RAW_HOOKS,
)

HOOKS6 = (*FILTER_HOOKS, *RAW_HOOKS)  # ip6tables: filter and raw

CT_ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED"
CT_INVALID = "-m conntrack --ctstate INVALID"
# ICMPv6 a pod may always send to its node (Felix's list): multicast listener query,
# report and done (130-132), router solicitation (133), neighbour solicitation and
# advertisement (135, 136).  Never router advertisements or redirects: a pod is no router.
ICMPV6_FROM_WL = (130, 131, 132, 133, 135, 136)


@dataclass(frozen=True)
class CalcConfig:
    node_name: str
    # What happens to a workload's traffic to the node itself once its egress policy
    # allowed it: ACCEPT (default; DNS or metrics on the host keep working) or DROP.
    wl_to_host_action: str = "ACCEPT"
    flow_logs: FlowLogConfig | None = None  # NFLOG rules at the verdicts (calc/flowlog.py)

    def __post_init__(self) -> None:
        if not self.node_name:
            raise ValueError("CalcConfig.node_name must not be empty")
        if self.wl_to_host_action not in WL_TO_HOST_ACTIONS:
            raise ValueError(f"wl_to_host_action must be one of {', '.join(WL_TO_HOST_ACTIONS)}, "
                             f"not {self.wl_to_host_action!r}")


def icmpv6_allowed(in_iface: str) -> tuple[str, ...]:
    return tuple(rule("-j ACCEPT", in_iface=in_iface, proto="ipv6-icmp", matches=(f"-m icmp6 --icmpv6-type {t}",))
                 for t in ICMPV6_FROM_WL)


def static_filter_chains(config: CalcConfig, family: int = 4) -> dict[str, tuple[str, ...]]:
    wl = WL_IFACE_WILDCARD
    icmpv6 = icmpv6_allowed(wl) if family == 6 else ()
    return {
        FILTER_FORWARD: (
            f"{CT_ESTABLISHED} -j ACCEPT",  # replies, and the rest of allowed connections
            f"{CT_INVALID} -j DROP",
            CLEAR_FORWARD_MARK,  # only this chain's verdict may make the last rule accept
            f"-i {wl} -j {FROM_WL_DISPATCH}",  # egress of the sender (drops or returns)
            f"-o {wl} -j {TO_WL_DISPATCH}",  # ingress of the receiver (drops or returns)
            # Both that apply passed: not ACCEPT here, which would skip every rule after our
            # hook (kube-proxy REJECTs a new connection to a Service without endpoints).
            f"-i {wl} {SET_FORWARD_MARK}",
            f"-o {wl} {SET_FORWARD_MARK}",
        ),
        FILTER_FORWARD_ACCEPT: (f"{IF_FORWARDED} -j ACCEPT",),
        # Only workload traffic is our business on INPUT; the host's own firewall stays theirs.
        FILTER_INPUT: (
            f"-i {wl} {CT_ESTABLISHED} -j ACCEPT",
            *icmpv6,
            f"-i {wl} {CT_INVALID} -j DROP",
            f"-i {wl} -g {WL_TO_HOST}",
        ),
        WL_TO_HOST: (
            f"-j {FROM_WL_DISPATCH}",  # anti-spoofing and the pod's egress policy
            f"-j {config.wl_to_host_action}",
        ),
        # Host -> local pod goes through OUTPUT, never FORWARD: kubelet probes and other
        # node traffic are always allowed (Kubernetes' rule), so nothing to add here.
        FILTER_OUTPUT: (),
    }


def local_endpoints(endpoints: Iterable[Endpoint], node_name: str, errors: list[str]) -> list[Endpoint]:
    """This node's endpoints that a CNI ADD wired (they have an interface).  A bad or
    duplicate interface name is reported and that endpoint left out (its traffic is then
    dropped by the dispatch chains rather than let through unchecked)."""
    out: list[Endpoint] = []
    seen: dict[str, str] = {}
    for ep in endpoints:
        if ep.node != node_name or not ep.iface:
            continue
        if not WL_IFACE_RE.match(ep.iface):
            errors.append(f"endpoint {ep.key}: interface {ep.iface!r} is not cali + 1-11 of [A-Za-z0-9_.-]; skipped")
            continue
        if ep.iface in seen:
            errors.append(f"endpoint {ep.key}: interface {ep.iface} is already used by {seen[ep.iface]}; skipped")
            continue
        seen[ep.iface] = ep.key
        out.append(ep)
    return out


def scheduled_endpoints(endpoints: Iterable[Endpoint], node_name: str, taken: set[str]) -> list[Endpoint]:
    """Pods scheduled to this node that no CNI ADD has wired yet, each with the interface
    the plugin will give it and no addresses (so nothing passes its anti-spoofing until
    the ADD records them).  A name already taken by a wired endpoint is left to it."""
    out = []
    for ep in endpoints:
        if ep.node == node_name and not ep.iface and ep.namespace:
            iface = host_iface_name(ep.namespace, ep.pod)
            if iface not in taken:
                out.append(dataclasses.replace(ep, iface=iface, ips=(), floating_ips=()))
    return out


def dataplane_state(cluster: Cluster, config: CalcConfig, errors: list[str] | None = None) -> DesiredState:
    """Desired chains, hooks and ipsets of node `config.node_name`.  Problems in the data
    (skipped rules, bad annotations...) are appended to `errors` when given.  Everything is
    computed from scratch (calc/incremental.py keeps the same result up to date)."""
    errs: list[str] = errors if errors is not None else []
    errs.extend(cluster.problems())
    endpoints = cluster.endpoints()
    everyone = SelectorIndex(endpoints, cluster.namespaces)
    return render_state(cluster, config, errs, endpoints, sorted(cluster.policies.values(), key=lambda p: p.key),
                        cluster.cluster_policies(), lambda spec: desired_ipset(spec, everyone),
                        lambda: pool_sets(cluster.pools.values(), cluster.nodes.values(), errs))


def render_state(cluster: Cluster, config: CalcConfig, errs: list[str], endpoints: Iterable[Endpoint],
                 policies: Iterable[NetworkPolicy], cluster_policies: Iterable[ClusterPolicy],
                 ipset_for: Callable[[SetSpec], IpSet],
                 pool_ipsets: Callable[[], dict[str, IpSet]]) -> DesiredState:
    """The state from this node's endpoints (`endpoints` may hold other nodes' too), the
    policies that may select them, sorted by key, the cluster policies in evaluation
    order (Cluster.cluster_policies) and the sets' members (`ipset_for`)."""
    wired = local_endpoints(endpoints, config.node_name, errs)
    local = wired + scheduled_endpoints(endpoints, config.node_name, {ep.iface for ep in wired})
    here = SelectorIndex(local, cluster.namespaces)

    filt = {family: static_filter_chains(config, family) for family in FAMILIES}
    sets: dict[SetSpec, None] = {}
    ingress_of: dict[str, list[str]] = {}
    egress_of: dict[str, list[str]] = {}

    flow = config.flow_logs
    flow_rules: dict[str, FlowRule] = {}
    np_names: dict[str, str] = {}  # NetworkPolicy id -> name, for the flow logs' default deny

    def use(render: Callable[[int], PolicyChains], policy: NetworkPolicy | ClusterPolicy) -> None:
        if flow is not None and isinstance(policy, NetworkPolicy):
            np_names[policy.id] = policy_name(policy)
        seen: tuple[str, ...] = ()
        for family in FAMILIES:
            if flow is None:
                rendered = render(family)
            else:  # the same chains with their log rules; both families, the same rule ids
                logged = logged_policy(policy, flow, family)
                rendered = logged.chains
                flow_rules.update(logged.rules)
            # The same input problems show in both families: report each once.
            errs.extend(e for e in rendered.errors if e not in seen)
            seen = rendered.errors
            filt[family].update(rendered.chains)
            sets.update(dict.fromkeys(rendered.sets))

    for policy in policies:
        selected = here.select(PeerSelector.of_policy(policy))
        if not selected:
            continue
        use(lambda family: policy_chains(policy, family), policy)
        for ptype, by_ep in (("Ingress", ingress_of), ("Egress", egress_of)):
            if ptype in policy.policy_types:
                for ep in selected:
                    by_ep.setdefault(ep.key, []).append(policy.id)
    # tier -> direction -> endpoint key -> cluster policy ids in order
    tiers: dict[tuple[str, str], dict[str, list[str]]] = {}
    for cp in cluster_policies:
        selected = here.select(subject_selector(cp))
        if not selected:
            continue
        use(lambda family: tier_policy_chains(cp, family), cp)
        for direction in ("ingress", "egress"):
            if getattr(cp, direction):
                by_ep = tiers.setdefault((cp.tier, direction), {})
                for ep in selected:
                    by_ep.setdefault(ep.key, []).append(cp.id)

    def policies_of(ep: Endpoint, direction: str, network: dict[str, list[str]]) -> EndpointPolicies:
        return EndpointPolicies(admin=tuple(tiers.get(("Admin", direction), {}).get(ep.key, ())),
                                network=tuple(network.get(ep.key, ())),
                                baseline=tuple(tiers.get(("Baseline", direction), {}).get(ep.key, ())))
    for ep in local:
        # The same text in both families (no addresses, no sets).
        own = endpoint_chains(ep, policies_of(ep, "ingress", ingress_of), policies_of(ep, "egress", egress_of))
        for family in FAMILIES:
            mine = dict(own)
            if flow is not None:
                for chain, direction, network in ((to_wl_chain(ep.iface), "ingress", ingress_of),
                                                  (from_wl_chain(ep.iface), "egress", egress_of)):
                    mine[chain], rules = logged_endpoint_chain(
                        own[chain], direction, [np_names[i] for i in network.get(ep.key, ())], flow, family)
                    flow_rules.update(rules)
            filt[family].update(mine)
    for family, chains in dispatch_chains(local, FAMILIES).items():
        filt[family].update(chains)

    ipsets = {spec.name: node_members(spec, cluster.nodes.values()) if isinstance(spec, NodeSet) else ipset_for(spec)
              for spec in sets}
    ipsets.update(pool_ipsets())
    for family in FAMILIES:
        src = sources_set(wired, family)
        ipsets[src.name] = src
    nat = nat_chains(wired, cluster.pools.values(), errs)
    return DesiredState(chains={"filter": filt[4], "nat": nat, "raw": raw_chains(4)}, hooks=HOOKS, ipsets=ipsets,
                        chains6={"filter": filt[6], "raw": raw_chains(6)}, hooks6=HOOKS6, flow_rules=flow_rules)
