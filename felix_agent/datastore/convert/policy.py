"""NetworkPolicy <-> record, validated the way the API server validates it (tortiectl applies
YAML nobody else has checked).
"""
from __future__ import annotations

import ipaddress
from typing import Any

from felix_agent.model import (
    IPBlock, LabelSelector, NetworkPolicy, PolicyPeer, PolicyPort, PolicyRule, SelectorRequirement,
)
from felix_agent.datastore.convert.common import (
    POLICY_TYPES, PROTOCOLS, Ctx, is_label_key, is_label_value, meta_of, k8s_obj, is_svc_name,
)

def selector_from_k8s(ctx: Ctx, v: Any, path: str) -> LabelSelector:
    d = ctx.mapping(v, path, ("matchLabels", "matchExpressions"))
    match_labels = ctx.labels(d.get("matchLabels"), f"{path}.matchLabels")
    exprs = []
    for i, e in enumerate(ctx.sequence(d.get("matchExpressions"), f"{path}.matchExpressions")):
        p = f"{path}.matchExpressions[{i}]"
        e = ctx.mapping(e, p, ("key", "operator", "values"))
        key = ctx.string(e.get("key"), f"{p}.key", required=True)
        if not is_label_key(key):
            raise ctx.fail(f"{p}.key", f"invalid label key {key!r}")
        op = e.get("operator")
        values = ctx.sequence(e.get("values"), f"{p}.values")
        for j, val in enumerate(values):
            if not isinstance(val, str) or not is_label_value(val):
                raise ctx.fail(f"{p}.values[{j}]", f"invalid label value {val!r}")
        if op in ("In", "NotIn"):
            if not values:
                raise ctx.fail(f"{p}.values", f"must be non-empty when operator is {op}")
        elif op in ("Exists", "DoesNotExist"):
            if values:
                raise ctx.fail(f"{p}.values", f"must be empty when operator is {op}")
        else:
            raise ctx.fail(f"{p}.operator",
                           f"{op!r} is not one of In, NotIn, Exists, DoesNotExist")
        exprs.append(SelectorRequirement(key=key, operator=op, values=tuple(values)))
    return LabelSelector(match_labels=match_labels, match_expressions=tuple(exprs))


def _ip_block(ctx: Ctx, v: Any, path: str) -> IPBlock:
    d = ctx.mapping(v, path, ("cidr", "except"))
    cidr = ctx.cidr(d.get("cidr"), f"{path}.cidr")
    outer = ipaddress.ip_network(cidr, strict=False)
    excepts = []
    for i, x in enumerate(ctx.sequence(d.get("except"), f"{path}.except")):
        p = f"{path}.except[{i}]"
        x = ctx.cidr(x, p)
        inner = ipaddress.ip_network(x, strict=False)
        # The API demands a strict subset: same family, inside cidr, longer prefix.
        if (inner.version != outer.version or not inner.subnet_of(outer)
                or inner.prefixlen <= outer.prefixlen):
            raise ctx.fail(p, f"{x} must be a strict subset of cidr {cidr}")
        excepts.append(x)
    return IPBlock(cidr=cidr, except_=tuple(excepts))


def _peer(ctx: Ctx, v: Any, path: str) -> PolicyPeer:
    d = ctx.mapping(v, path, ("podSelector", "namespaceSelector", "ipBlock"))
    has_sel = "podSelector" in d or "namespaceSelector" in d
    if "ipBlock" in d and d["ipBlock"] is not None:
        if has_sel:
            raise ctx.fail(path, "may not set ipBlock together with podSelector/namespaceSelector")
        return PolicyPeer(ip_block=_ip_block(ctx, d["ipBlock"], f"{path}.ipBlock"))
    if not has_sel:
        raise ctx.fail(path, "must specify a peer: ipBlock, podSelector or namespaceSelector")
    pod = selector_from_k8s(ctx, d["podSelector"], f"{path}.podSelector") if "podSelector" in d else None
    ns = (selector_from_k8s(ctx, d["namespaceSelector"], f"{path}.namespaceSelector")
          if "namespaceSelector" in d else None)
    return PolicyPeer(pod_selector=pod, namespace_selector=ns)


def _port(ctx: Ctx, v: Any, path: str) -> PolicyPort:
    d = ctx.mapping(v, path, ("protocol", "port", "endPort"))
    proto = d.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        raise ctx.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
    port = d.get("port")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, (int, str)):
            raise ctx.fail(f"{path}.port", f"must be a number or a port name, got {port!r}")
        if isinstance(port, int):
            if not 1 <= port <= 65535:
                raise ctx.fail(f"{path}.port", f"{port} is not a valid port number (1-65535)")
        elif not is_svc_name(port):
            raise ctx.fail(f"{path}.port", f"{port!r} is not a valid port name (IANA_SVC_NAME: "
                           "<=15 lowercase letters, digits and '-', at least one letter)")
    end = d.get("endPort")
    if end is not None:
        if not isinstance(port, int):
            raise ctx.fail(f"{path}.endPort", "may only be set with a numeric port")
        end = ctx.integer(end, f"{path}.endPort", 1, 65535)
        if end < port:
            raise ctx.fail(f"{path}.endPort", f"{end} must be >= port {port}")
    return PolicyPort(protocol=proto, port=port, end_port=end)


def _rule(ctx: Ctx, v: Any, path: str, peers_field: str) -> PolicyRule:
    d = ctx.mapping(v, path, (peers_field, "ports"))
    peers = tuple(_peer(ctx, p, f"{path}.{peers_field}[{i}]")
                  for i, p in enumerate(ctx.sequence(d.get(peers_field), f"{path}.{peers_field}")))
    ports = tuple(_port(ctx, p, f"{path}.ports[{i}]")
                  for i, p in enumerate(ctx.sequence(d.get("ports"), f"{path}.ports")))
    return PolicyRule(peers=peers, ports=ports)


def network_policy_from_k8s(ctx: Ctx, obj: dict) -> NetworkPolicy:
    ctx.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    name, ns, _ = meta_of(ctx, obj, namespaced=True)
    spec = ctx.mapping(obj.get("spec"), "spec", ("podSelector", "ingress", "egress", "policyTypes"))
    pod_selector = selector_from_k8s(ctx, spec.get("podSelector"), "spec.podSelector")
    ingress = tuple(_rule(ctx, r, f"spec.ingress[{i}]", "from")
                    for i, r in enumerate(ctx.sequence(spec.get("ingress"), "spec.ingress")))
    egress = tuple(_rule(ctx, r, f"spec.egress[{i}]", "to")
                   for i, r in enumerate(ctx.sequence(spec.get("egress"), "spec.egress")))
    types = ctx.sequence(spec.get("policyTypes"), "spec.policyTypes")
    if not types:
        # The API server's defaulting: Ingress always, Egress when there are egress rules.
        types = ["Ingress"] + (["Egress"] if egress else [])
    for i, t in enumerate(types):
        if t not in POLICY_TYPES:
            raise ctx.fail(f"spec.policyTypes[{i}]", f"{t!r} is not one of Ingress, Egress")
    if len(set(types)) != len(types):
        raise ctx.fail("spec.policyTypes", f"duplicate entries in {types}")
    # A canonical order, so ["Egress","Ingress"] and ["Ingress","Egress"] compare equal.
    types = tuple(t for t in POLICY_TYPES if t in types)
    return NetworkPolicy(namespace=ns, name=name, pod_selector=pod_selector, ingress=ingress,
                         egress=egress, policy_types=types)


def selector_k8s(sel: LabelSelector) -> dict:
    out: dict[str, Any] = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator, **({"values": list(r.values)} if r.values else {})}
            for r in sel.match_expressions]
    return out


def _peer_k8s(p: PolicyPeer) -> dict:
    if p.ip_block is not None:
        b: dict[str, Any] = {"cidr": p.ip_block.cidr}
        if p.ip_block.except_:
            b["except"] = list(p.ip_block.except_)
        return {"ipBlock": b}
    out = {}
    if p.pod_selector is not None:
        out["podSelector"] = selector_k8s(p.pod_selector)
    if p.namespace_selector is not None:
        out["namespaceSelector"] = selector_k8s(p.namespace_selector)
    return out


def _rule_k8s(r: PolicyRule, peers_field: str) -> dict:
    out: dict[str, Any] = {}
    if r.ports:
        out["ports"] = [{"protocol": p.protocol,
                         **({"port": p.port} if p.port is not None else {}),
                         **({"endPort": p.end_port} if p.end_port is not None else {})}
                        for p in r.ports]
    if r.peers:
        out[peers_field] = [_peer_k8s(p) for p in r.peers]
    return out


def network_policy_k8s(r: NetworkPolicy) -> dict:
    spec = {"podSelector": selector_k8s(r.pod_selector), "policyTypes": list(r.policy_types)}
    if r.ingress:
        spec["ingress"] = [_rule_k8s(x, "from") for x in r.ingress]
    if r.egress:
        spec["egress"] = [_rule_k8s(x, "to") for x in r.egress]
    return k8s_obj("NetworkPolicy", r.name, spec, r.namespace)
