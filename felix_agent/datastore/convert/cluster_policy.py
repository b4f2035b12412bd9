"""ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) and AdminNetworkPolicy /
BaselineAdminNetworkPolicy (v1alpha1) <-> one ClusterPolicy record, checked as their CRD
schemas check them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from felix_agent.model import (
    BANP_PRIORITY, AdminNetworkPolicy, BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy, ClusterPolicy,
    NamespacedPods,
    TIERS, TierAction, TierPeer, TierPort, TierRule,
)
from felix_agent.datastore.convert.common import PROTOCOLS, Ctx, meta_of, k8s_obj
from felix_agent.datastore.convert.policy import selector_from_k8s, selector_k8s

@dataclass(frozen=True)
class _Flavour:
    """How one of the three kinds spells the shared model, and its CRD's limits."""

    kind: str
    actions: dict[str, TierAction]  # the API's word -> the model's action
    max_rules: int  # per direction
    max_items: int  # peers per rule, ports per rule
    ports_field: str  # "protocols" (CNP) | "ports" (ANP/BANP)
    spec_fields: tuple[str, ...]


_CNP = _Flavour("ClusterNetworkPolicy", {"Accept": "Accept", "Deny": "Deny", "Pass": "Pass"}, 25, 25,
                "protocols", ("tier", "priority", "subject", "ingress", "egress"))
_ANP = _Flavour("AdminNetworkPolicy", {"Allow": "Accept", "Deny": "Deny", "Pass": "Pass"}, 100, 100,
                "ports", ("priority", "subject", "ingress", "egress"))
_BANP = _Flavour("BaselineAdminNetworkPolicy", {"Allow": "Accept", "Deny": "Deny"}, 100, 100,
                 "ports", ("subject", "ingress", "egress"))
_FLAVOURS = {f.kind: f for f in (_CNP, _ANP, _BANP)}
MAX_NETWORKS = 25
MAX_RULE_NAME = 100
MAX_CIDR_TEXT = 43  # the CRD's maxLength of a CIDR
# Egress peer kinds the API has that tortie does not enforce: refused with a clear error
# rather than ignored (ignoring a Deny would let through what the admin meant to block).
_UNSUPPORTED_PEERS = {"domainNames": "domainNames peers (experimental upstream) are not supported by tortie"}


def _exactly_one(ctx: Ctx, d: dict, path: str, fields: tuple[str, ...]) -> str:
    """The one field of `fields` set in d (the CRDs' MinProperties=MaxProperties=1)."""
    set_ = [f for f in fields if d.get(f) is not None]
    if len(set_) != 1:
        raise ctx.fail(path, f"exactly one of {', '.join(fields)} must be set"
                       + (f", got {', '.join(set_)}" if set_ else ""))
    return set_[0]


def _items(ctx: Ctx, v: Any, path: str, lo: int, hi: int) -> list:
    items = ctx.sequence(v, path)
    if not lo <= len(items) <= hi:
        raise ctx.fail(path, f"must have {lo} to {hi} items, got {len(items)}")
    return items


def _namespaced_pods(ctx: Ctx, v: Any, path: str) -> NamespacedPods:
    d = ctx.mapping(v, path, ("namespaceSelector", "podSelector"))
    if d.get("podSelector") is None:
        raise ctx.fail(f"{path}.podSelector", "is required")
    return NamespacedPods(namespaces=selector_from_k8s(ctx, d.get("namespaceSelector"), f"{path}.namespaceSelector"),
                          pods=selector_from_k8s(ctx, d["podSelector"], f"{path}.podSelector"))


def _tier_peer(ctx: Ctx, v: Any, path: str, fields: tuple[str, ...]) -> TierPeer:
    d = ctx.mapping(v, path, fields)
    which = _exactly_one(ctx, d, path, fields)
    if which in _UNSUPPORTED_PEERS:
        raise ctx.fail(f"{path}.{which}", _UNSUPPORTED_PEERS[which])
    if which == "namespaces":
        return TierPeer(namespaces=selector_from_k8s(ctx, d[which], f"{path}.namespaces"))
    if which == "pods":
        return TierPeer(pods=_namespaced_pods(ctx, d[which], f"{path}.pods"))
    if which == "nodes":
        return TierPeer(nodes=selector_from_k8s(ctx, d[which], f"{path}.nodes"))
    nets = _items(ctx, d[which], f"{path}.networks", 1, MAX_NETWORKS)
    out = []
    for i, n in enumerate(nets):
        p = f"{path}.networks[{i}]"
        cidr = ctx.cidr(n, p)
        if len(cidr) > MAX_CIDR_TEXT:
            raise ctx.fail(p, f"is longer than {MAX_CIDR_TEXT} characters")
        if cidr in out:
            raise ctx.fail(p, f"duplicate entry {cidr!r}")
        out.append(cidr)
    return TierPeer(networks=tuple(out))


def _port_number(ctx: Ctx, d: dict, path: str) -> tuple[int, int | None]:
    """CNP's destinationPort: {number} or {range: {start, end}} -> (port, end or None)."""
    d = ctx.mapping(d, path, ("number", "range"))
    if _exactly_one(ctx, d, path, ("number", "range")) == "number":
        return ctx.integer(d["number"], f"{path}.number", 1, 65535), None
    r = ctx.mapping(d["range"], f"{path}.range", ("start", "end"))
    start = ctx.integer(r.get("start"), f"{path}.range.start", 1, 65535)
    end = ctx.integer(r.get("end"), f"{path}.range.end", 1, 65535)
    if not start < end:
        raise ctx.fail(f"{path}.range", f"start {start} must be less than end {end}")
    return start, end


def _cnp_port(ctx: Ctx, v: Any, path: str) -> TierPort:
    fields = ("tcp", "udp", "sctp", "destinationNamedPort")
    d = ctx.mapping(v, path, fields)
    which = _exactly_one(ctx, d, path, fields)
    if which == "destinationNamedPort":
        return TierPort(protocol=None, name=ctx.string(d[which], f"{path}.{which}", required=True))
    proto = ctx.mapping(d[which], f"{path}.{which}", ("destinationPort",))
    if proto.get("destinationPort") is None:
        raise ctx.fail(f"{path}.{which}.destinationPort", "is required")
    port, end = _port_number(ctx, proto["destinationPort"], f"{path}.{which}.destinationPort")
    return TierPort(protocol=which.upper(), port=port, end_port=end)  # type: ignore[arg-type]


def _anp_protocol(ctx: Ctx, d: dict, path: str) -> str:
    proto = d.get("protocol") or "TCP"  # the CRD's default
    if proto not in PROTOCOLS:
        raise ctx.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
    return proto


def _anp_port(ctx: Ctx, v: Any, path: str) -> TierPort:
    fields = ("portNumber", "namedPort", "portRange")
    d = ctx.mapping(v, path, fields)
    which = _exactly_one(ctx, d, path, fields)
    if which == "namedPort":
        return TierPort(protocol=None, name=ctx.string(d[which], f"{path}.namedPort", required=True))
    p = f"{path}.{which}"
    if which == "portNumber":
        n = ctx.mapping(d[which], p, ("protocol", "port"))
        return TierPort(protocol=_anp_protocol(ctx, n, p),  # type: ignore[arg-type]
                        port=ctx.integer(n.get("port"), f"{p}.port", 1, 65535))
    r = ctx.mapping(d[which], p, ("protocol", "start", "end"))
    start = ctx.integer(r.get("start"), f"{p}.start", 1, 65535)
    end = ctx.integer(r.get("end"), f"{p}.end", 1, 65535)
    if not start < end:
        raise ctx.fail(p, f"start {start} must be less than end {end}")
    return TierPort(protocol=_anp_protocol(ctx, r, p), port=start, end_port=end)  # type: ignore[arg-type]


def _tier_rule(ctx: Ctx, v: Any, path: str, fl: _Flavour, egress: bool) -> TierRule:
    peers_field = "to" if egress else "from"
    d = ctx.mapping(v, path, ("name", "action", peers_field, fl.ports_field))
    name = ctx.string(d.get("name"), f"{path}.name")
    if len(name) > MAX_RULE_NAME:
        raise ctx.fail(f"{path}.name", f"is longer than {MAX_RULE_NAME} characters")
    action = d.get("action")
    if action not in fl.actions:
        raise ctx.fail(f"{path}.action", f"{action!r} is not one of {', '.join(fl.actions)}")
    peer_fields = ("namespaces", "pods") + (("nodes", "networks", "domainNames") if egress else ())
    peers = tuple(_tier_peer(ctx, p, f"{path}.{peers_field}[{i}]", peer_fields) for i, p in
                  enumerate(_items(ctx, d.get(peers_field), f"{path}.{peers_field}", 1, fl.max_items)))
    ports: tuple[TierPort, ...] = ()
    if d.get(fl.ports_field) is not None:
        one = _cnp_port if fl is _CNP else _anp_port
        ports = tuple(one(ctx, p, f"{path}.{fl.ports_field}[{i}]") for i, p in
                      enumerate(_items(ctx, d[fl.ports_field], f"{path}.{fl.ports_field}", 1, fl.max_items)))
    if any(p.networks or p.nodes is not None for p in peers) and any(p.name for p in ports):
        raise ctx.fail(path, "a networks or nodes peer cannot be combined with a named port "
                       "(they have no named ports)")
    return TierRule(action=fl.actions[action], peers=peers, ports=ports, name=name)


def cluster_policy_from_k8s(ctx: Ctx, obj: dict) -> ClusterPolicy:
    fl = _FLAVOURS[ctx.kind]
    ctx.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    name, _, _ = meta_of(ctx, obj, namespaced=False)
    if fl is _BANP and name != "default":
        raise ctx.fail("metadata.name", f"must be 'default' (there is one {fl.kind} per cluster), got {name!r}")
    if obj.get("spec") is None:
        raise ctx.fail("spec", "is required")
    spec = ctx.mapping(obj["spec"], "spec", fl.spec_fields)
    if fl is _CNP:
        tier = spec.get("tier")
        if tier not in TIERS:
            raise ctx.fail("spec.tier", f"{tier!r} is not one of {', '.join(TIERS)}")
    else:
        tier = "Admin" if fl is _ANP else "Baseline"
    priority = BANP_PRIORITY
    if fl is not _BANP:
        if spec.get("priority") is None:
            raise ctx.fail("spec.priority", "is required")
        priority = ctx.integer(spec["priority"], "spec.priority", 0, 1000)
    if spec.get("subject") is None:
        raise ctx.fail("spec.subject", "is required")
    subject = _tier_peer(ctx, spec["subject"], "spec.subject", ("namespaces", "pods"))
    rules = {}
    for direction in ("ingress", "egress"):
        rules[direction] = tuple(
            _tier_rule(ctx, r, f"spec.{direction}[{i}]", fl, direction == "egress")
            for i, r in enumerate(_items(ctx, spec.get(direction), f"spec.{direction}", 0, fl.max_rules)))
    cls = {"ClusterNetworkPolicy": ClusterNetworkPolicy, "AdminNetworkPolicy": AdminNetworkPolicy,
           "BaselineAdminNetworkPolicy": BaselineAdminNetworkPolicy}[fl.kind]
    return cls(name=name, tier=tier, priority=priority, subject=subject, ingress=rules["ingress"],
               egress=rules["egress"])


def _tier_peer_k8s(p: TierPeer) -> dict:
    if p.namespaces is not None:
        return {"namespaces": selector_k8s(p.namespaces)}
    if p.pods is not None:
        return {"pods": {"namespaceSelector": selector_k8s(p.pods.namespaces),
                         "podSelector": selector_k8s(p.pods.pods)}}
    if p.nodes is not None:
        return {"nodes": selector_k8s(p.nodes)}
    return {"networks": list(p.networks)}


def _tier_port_k8s(p: TierPort, fl: _Flavour) -> dict:
    if p.name:
        return {"destinationNamedPort" if fl is _CNP else "namedPort": p.name}
    if fl is _CNP:
        number = {"number": p.port} if p.end_port is None else {"range": {"start": p.port, "end": p.end_port}}
        return {(p.protocol or "TCP").lower(): {"destinationPort": number}}
    if p.end_port is None:
        return {"portNumber": {"protocol": p.protocol, "port": p.port}}
    return {"portRange": {"protocol": p.protocol, "start": p.port, "end": p.end_port}}


def cluster_policy_k8s(r: ClusterPolicy) -> dict:
    fl = _FLAVOURS[r.kind]
    word = {model_action: api_word for api_word, model_action in fl.actions.items()}
    spec: dict[str, Any] = {}
    if fl is _CNP:
        spec["tier"] = r.tier
    if fl is not _BANP:
        spec["priority"] = r.priority
    spec["subject"] = _tier_peer_k8s(r.subject)
    for direction, peers_field in (("ingress", "from"), ("egress", "to")):
        rules = []
        for rule in getattr(r, direction):
            out: dict[str, Any] = {"action": word[rule.action], peers_field: [_tier_peer_k8s(p) for p in rule.peers]}
            if rule.name:
                out["name"] = rule.name
            if rule.ports:
                out[fl.ports_field] = [_tier_port_k8s(p, fl) for p in rule.ports]
            rules.append(out)
        if rules:
            spec[direction] = rules
    return k8s_obj(r.kind, r.name, spec)
