"""Builders shared by the test_calc_* modules (kept tiny so each test reads on its own)."""
from __future__ import annotations

import hashlib

from felix_agent.calc.cluster import FLOATING_IPS_ANNOTATION, Cluster
from felix_agent.calc.desired import DesiredState
from felix_agent.calc.filter import CalcConfig, dataplane_state
from felix_agent.model import (
    KIND_OF,
    IPBlock,
    LabelSelector,
    NamedPort,
    NetworkPolicy,
    Pod,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
    SelectorRequirement,
    Update,
    WorkloadEndpoint,
)

ME = "n1"


def sel(*exprs: SelectorRequirement, **labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(labels.items())), tuple(exprs))


def req(key: str, op: str, *values: str) -> SelectorRequirement:
    return SelectorRequirement(key, op, tuple(values))


def iface_of(ns: str, name: str) -> str:
    """The CNI plugin's naming: cali + 11 hex of sha1("<namespace>.<pod>")."""
    return "cali" + hashlib.sha1(f"{ns}.{name}".encode()).hexdigest()[:11]


def pod(ns: str, name: str, ip: str, node: str = ME, labels: dict | None = None,
        ports: tuple[NamedPort, ...] = (), fips: str | None = None, wired: bool = True, ip6: str = "") -> list:
    """A Pod and (wired=True) the WorkloadEndpoint its node's CNI ADD wrote; `ip6` makes it
    dual-stack (`ip` may be IPv6 too: an IPv6-only pod)."""
    ann = ((FLOATING_IPS_ANNOTATION, fips),) if fips is not None else ()
    ips = (ip, ip6) if ip6 else (ip,)
    out = [Pod(ns, name, labels=tuple(sorted((labels or {}).items())), node=node, ips=ips,
               ports=ports, annotations=ann)]
    if wired:
        out.append(WorkloadEndpoint(ns, name, node, "c-" + name, iface_of(ns, name), ips))
    return out


def upd(record) -> Update:
    return Update(KIND_OF[type(record)], record.key, record)


def delete(record) -> Update:
    return Update(KIND_OF[type(record)], record.key, None)


def cluster_of(*records) -> Cluster:
    c = Cluster()
    for r in records:
        for rec in (r if isinstance(r, list) else [r]):
            c.apply(upd(rec))
    return c


def state(c: Cluster, node: str = ME, errors: list | None = None, **cfg) -> DesiredState:
    return dataplane_state(c, CalcConfig(node_name=node, **cfg), errors)


def ingress(ns: str, name: str, selector: LabelSelector, *rules: PolicyRule) -> NetworkPolicy:
    return NetworkPolicy(ns, name, pod_selector=selector, ingress=tuple(rules), policy_types=("Ingress",))


def egress(ns: str, name: str, selector: LabelSelector, *rules: PolicyRule) -> NetworkPolicy:
    return NetworkPolicy(ns, name, pod_selector=selector, egress=tuple(rules), policy_types=("Egress",))


def rule_(*peers: PolicyPeer, ports: tuple[PolicyPort, ...] = ()) -> PolicyRule:
    return PolicyRule(peers=tuple(peers), ports=ports)


def from_pods(selector: LabelSelector | None = None, ns: LabelSelector | None = None) -> PolicyPeer:
    return PolicyPeer(pod_selector=selector, namespace_selector=ns)


def from_block(cidr: str, *excepts: str) -> PolicyPeer:
    return PolicyPeer(ip_block=IPBlock(cidr, tuple(excepts)))


__all__ = [name for name in dir() if not name.startswith("_")]
