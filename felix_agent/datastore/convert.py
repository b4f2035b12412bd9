"""Kubernetes-shaped objects <-> the typed model records (felix_agent.model).

Both datastores and tortiectl go through here, so an object means the same thing wherever
it came from:

- `from_k8s(obj)` turns a Pod, Namespace, Node or NetworkPolicy in the real API shape
  (exactly what kube-apiserver v1.28 returns), or one of tortie's own kinds (IPPool,
  BGPPeer, WorkloadEndpoint, BlockAffinity, apiVersion "tortie.io/v1"), into a record.
  Invalid input raises `ConvertError` naming the object and the field.
- `to_k8s(record)` is the inverse, for every kind: the etcd backend stores this shape, and
  `from_k8s(to_k8s(r)) == r` holds for every valid record.

NetworkPolicy is validated the way the API server validates it (tortiectl applies YAML
nobody else has checked); the other built-in kinds are taken as the API server gives
them, with only the fields tortie reads checked.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
import ipaddress
import socket
import re
from typing import Any, Callable

from felix_agent import model
from felix_agent.model import (
    BANP_PRIORITY, AdminNetworkPolicy, BaselineAdminNetworkPolicy, BGPPeer, BlockAffinity,
    ClusterNetworkPolicy, ClusterPolicy, IPBlock, IPPool, LabelSelector, NamedPort, Namespace,
    NamespacedPods, NetworkPolicy, Node, Pod, PolicyPeer, PolicyPort, PolicyRule, Record,
    SelectorRequirement, TIERS, TierAction, TierPeer, TierPort, TierRule, WorkloadEndpoint,
)

TORTIE_API_VERSION = "tortie.io/v1"
NETWORKING_API_VERSION = "networking.k8s.io/v1"
# kubernetes-sigs/network-policy-api: ClusterNetworkPolicy as of release v0.2.0 (v1alpha2),
# AdminNetworkPolicy/BaselineAdminNetworkPolicy as of release v0.1.7 (v1alpha1).
POLICY_API_GROUP = "policy.networking.k8s.io"
CNP_API_VERSION = POLICY_API_GROUP + "/v1alpha2"
ANP_API_VERSION = POLICY_API_GROUP + "/v1alpha1"
API_VERSION = {
    "Pod": "v1", "Namespace": "v1", "Node": "v1", "NetworkPolicy": NETWORKING_API_VERSION,
    "ClusterNetworkPolicy": CNP_API_VERSION, "AdminNetworkPolicy": ANP_API_VERSION,
    "BaselineAdminNetworkPolicy": ANP_API_VERSION,
    "IPPool": TORTIE_API_VERSION, "BGPPeer": TORTIE_API_VERSION,
    "WorkloadEndpoint": TORTIE_API_VERSION, "BlockAffinity": TORTIE_API_VERSION,
}
OWN_KINDS = frozenset({"IPPool", "BGPPeer", "WorkloadEndpoint", "BlockAffinity"})

# Node annotations tortie reads (and writes back in to_k8s).
ANN_IPV4 = "tortie.io/ipv4-address"
ANN_IPV6 = "tortie.io/ipv6-address"
ANN_AS = "tortie.io/as-number"
ANN_VXLAN_ADDR = "tortie.io/vxlan-tunnel-addr"
ANN_VXLAN_MAC = "tortie.io/vxlan-tunnel-mac"
ANN_IPIP_ADDR = "tortie.io/ipip-tunnel-addr"
ANN_RR_CLUSTER = "tortie.io/route-reflector-cluster-id"
# kubectl keeps a full copy of the applied object here; it is large and means nothing to
# the dataplane, so Pod records leave it out (a re-apply would otherwise look like churn).
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")
POOL_MODES = ("bgp", "direct", "vxlan", "ipip")
MAX_AS = 4294967295  # 4-byte AS numbers


class ConvertError(ValueError):
    """An object that cannot become a record; the message names the object and field."""


# --- small validators -------------------------------------------------------------------

# IANA_SVC_NAME as the API defines it: <= 15 chars, lowercase alphanumerics and '-',
# at least one letter, no leading/trailing '-', no '--'.
_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def is_svc_name(s: str) -> bool:
    return (len(s) <= 15 and bool(_SVC_NAME.match(s)) and "--" not in s
            and any(c.isalpha() for c in s))


# Label keys and values repeat across pods (app, tier, version...): each is checked once.
@functools.lru_cache(maxsize=1 << 14)
def _is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


@functools.lru_cache(maxsize=1 << 14)
def _is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


class _Ctx:
    """Who is being converted, so every error says which object and which field."""

    def __init__(self, kind: str, obj: dict):
        self.kind = kind
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = meta.get("name") or "<unnamed>"
        ns = meta.get("namespace")
        self.who = f"{kind} {ns}/{name}" if ns else f"{kind} {name}"

    def fail(self, path: str, msg: str) -> ConvertError:
        return ConvertError(f"{self.who}: {path}: {msg}" if path else f"{self.who}: {msg}")

    def mapping(self, v: Any, path: str, allowed: tuple[str, ...] | None = None) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(path, f"must be an object, got {type(v).__name__}")
        if allowed is not None:
            for k in v:
                if k not in allowed:
                    raise self.fail(f"{path}.{k}" if path else k,
                                    f"unknown field {k!r} (allowed: {', '.join(allowed)})")
        return v

    def sequence(self, v: Any, path: str) -> list:
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(path, f"must be a list, got {type(v).__name__}")
        return v

    def string(self, v: Any, path: str, required: bool = False) -> str:
        if v is None or v == "":
            if required:
                raise self.fail(path, "is required")
            return ""
        if not isinstance(v, str):
            raise self.fail(path, f"must be a string, got {v!r}")
        return v

    def boolean(self, v: Any, path: str, default: bool = False) -> bool:
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(path, f"must be true or false, got {v!r}")
        return v

    def integer(self, v: Any, path: str, lo: int, hi: int, from_str: bool = False) -> int:
        """from_str: annotations hold numbers as strings."""
        # bool is an int subclass; `port: true` is a mistake, not 1.
        if isinstance(v, bool) or not isinstance(v, int):
            if from_str and isinstance(v, str) and v.strip().isdigit():
                v = int(v)
            else:
                raise self.fail(path, f"must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise self.fail(path, f"{v} is out of range {lo}-{hi}")
        return v

    def labels(self, v: Any, path: str) -> model.Labels:
        d = self.mapping(v, path)
        for k, val in d.items():
            if not isinstance(k, str) or not _is_label_key(k):
                raise self.fail(f"{path}", f"invalid label key {k!r}")
            if not isinstance(val, str) or not _is_label_value(val):
                raise self.fail(f"{path}.{k}", f"invalid label value {val!r}")
        return model.labels_of(d)

    def cidr(self, v: Any, path: str, strict: bool = False) -> str:
        s = self.string(v, path, required=True)
        try:
            ipaddress.ip_network(s, strict=strict)
        except ValueError as e:
            raise self.fail(path, f"{s!r} is not a valid CIDR ({e})") from None
        if "/" not in s:
            raise self.fail(path, f"{s!r} is not a valid CIDR (needs a /prefix length)")
        return s

    def address(self, v: Any, path: str) -> str:
        """A plain address; "10.0.0.5/32" is accepted and stored as "10.0.0.5"."""
        s = self.string(v, path, required=True)
        if _canonical_ipv4(s):
            return s  # every pod's IP on every list: the fast path (ipaddress takes ~15 us)
        try:
            iface = ipaddress.ip_interface(s)
        except ValueError:
            raise self.fail(path, f"{s!r} is not a valid IP address") from None
        if "/" in s and iface.network.prefixlen != iface.max_prefixlen:
            raise self.fail(path, f"{s!r} must be a single address")
        return str(iface.ip)

    def interface(self, v: Any, path: str, version: int) -> str:
        """An address with its prefix, "192.168.100.11/24"."""
        s = self.string(v, path, required=True)
        try:
            iface = ipaddress.ip_interface(s)
        except ValueError:
            raise self.fail(path, f"{s!r} is not a valid address/prefix") from None
        if iface.version != version:
            raise self.fail(path, f"{s!r} is not an IPv{version} address")
        if "/" not in s:
            s = f"{s}/{iface.max_prefixlen}"
        return s


def _canonical_ipv4(s: str) -> bool:
    """True for a dotted-quad IPv4 address already in canonical form (no leading zeros,
    no prefix), as ipaddress would print it; anything else takes the full check."""
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, s)) == s
    except (OSError, ValueError):
        return False


def _meta(ctx: _Ctx, obj: dict, namespaced: bool) -> tuple[str, str, dict]:
    meta = ctx.mapping(obj.get("metadata"), "metadata")
    name = ctx.string(meta.get("name"), "metadata.name", required=True)
    ns = ""
    if namespaced:
        # kubectl puts objects without a namespace into "default"; do the same.
        ns = ctx.string(meta.get("namespace"), "metadata.namespace") or "default"
    return name, ns, meta


# --- selectors and policy ---------------------------------------------------------------

def _selector(ctx: _Ctx, v: Any, path: str) -> LabelSelector:
    d = ctx.mapping(v, path, ("matchLabels", "matchExpressions"))
    match_labels = ctx.labels(d.get("matchLabels"), f"{path}.matchLabels")
    exprs = []
    for i, e in enumerate(ctx.sequence(d.get("matchExpressions"), f"{path}.matchExpressions")):
        p = f"{path}.matchExpressions[{i}]"
        e = ctx.mapping(e, p, ("key", "operator", "values"))
        key = ctx.string(e.get("key"), f"{p}.key", required=True)
        if not _is_label_key(key):
            raise ctx.fail(f"{p}.key", f"invalid label key {key!r}")
        op = e.get("operator")
        values = ctx.sequence(e.get("values"), f"{p}.values")
        for j, val in enumerate(values):
            if not isinstance(val, str) or not _is_label_value(val):
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


def _ip_block(ctx: _Ctx, v: Any, path: str) -> IPBlock:
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


def _peer(ctx: _Ctx, v: Any, path: str) -> PolicyPeer:
    d = ctx.mapping(v, path, ("podSelector", "namespaceSelector", "ipBlock"))
    has_sel = "podSelector" in d or "namespaceSelector" in d
    if "ipBlock" in d and d["ipBlock"] is not None:
        if has_sel:
            raise ctx.fail(path, "may not set ipBlock together with podSelector/namespaceSelector")
        return PolicyPeer(ip_block=_ip_block(ctx, d["ipBlock"], f"{path}.ipBlock"))
    if not has_sel:
        raise ctx.fail(path, "must specify a peer: ipBlock, podSelector or namespaceSelector")
    pod = _selector(ctx, d["podSelector"], f"{path}.podSelector") if "podSelector" in d else None
    ns = (_selector(ctx, d["namespaceSelector"], f"{path}.namespaceSelector")
          if "namespaceSelector" in d else None)
    return PolicyPeer(pod_selector=pod, namespace_selector=ns)


def _port(ctx: _Ctx, v: Any, path: str) -> PolicyPort:
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


def _rule(ctx: _Ctx, v: Any, path: str, peers_field: str) -> PolicyRule:
    d = ctx.mapping(v, path, (peers_field, "ports"))
    peers = tuple(_peer(ctx, p, f"{path}.{peers_field}[{i}]")
                  for i, p in enumerate(ctx.sequence(d.get(peers_field), f"{path}.{peers_field}")))
    ports = tuple(_port(ctx, p, f"{path}.ports[{i}]")
                  for i, p in enumerate(ctx.sequence(d.get("ports"), f"{path}.ports")))
    return PolicyRule(peers=peers, ports=ports)


def _network_policy(ctx: _Ctx, obj: dict) -> NetworkPolicy:
    ctx.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    name, ns, _ = _meta(ctx, obj, namespaced=True)
    spec = ctx.mapping(obj.get("spec"), "spec", ("podSelector", "ingress", "egress", "policyTypes"))
    pod_selector = _selector(ctx, spec.get("podSelector"), "spec.podSelector")
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


# --- tiered cluster policy (policy.networking.k8s.io) -----------------------------------

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


def _exactly_one(ctx: _Ctx, d: dict, path: str, fields: tuple[str, ...]) -> str:
    """The one field of `fields` set in d (the CRDs' MinProperties=MaxProperties=1)."""
    set_ = [f for f in fields if d.get(f) is not None]
    if len(set_) != 1:
        raise ctx.fail(path, f"exactly one of {', '.join(fields)} must be set"
                       + (f", got {', '.join(set_)}" if set_ else ""))
    return set_[0]


def _items(ctx: _Ctx, v: Any, path: str, lo: int, hi: int) -> list:
    items = ctx.sequence(v, path)
    if not lo <= len(items) <= hi:
        raise ctx.fail(path, f"must have {lo} to {hi} items, got {len(items)}")
    return items


def _namespaced_pods(ctx: _Ctx, v: Any, path: str) -> NamespacedPods:
    d = ctx.mapping(v, path, ("namespaceSelector", "podSelector"))
    if d.get("podSelector") is None:
        raise ctx.fail(f"{path}.podSelector", "is required")
    return NamespacedPods(namespaces=_selector(ctx, d.get("namespaceSelector"), f"{path}.namespaceSelector"),
                          pods=_selector(ctx, d["podSelector"], f"{path}.podSelector"))


def _tier_peer(ctx: _Ctx, v: Any, path: str, fields: tuple[str, ...]) -> TierPeer:
    d = ctx.mapping(v, path, fields)
    which = _exactly_one(ctx, d, path, fields)
    if which in _UNSUPPORTED_PEERS:
        raise ctx.fail(f"{path}.{which}", _UNSUPPORTED_PEERS[which])
    if which == "namespaces":
        return TierPeer(namespaces=_selector(ctx, d[which], f"{path}.namespaces"))
    if which == "pods":
        return TierPeer(pods=_namespaced_pods(ctx, d[which], f"{path}.pods"))
    if which == "nodes":
        return TierPeer(nodes=_selector(ctx, d[which], f"{path}.nodes"))
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


def _port_number(ctx: _Ctx, d: dict, path: str) -> tuple[int, int | None]:
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


def _cnp_port(ctx: _Ctx, v: Any, path: str) -> TierPort:
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


def _anp_protocol(ctx: _Ctx, d: dict, path: str) -> str:
    proto = d.get("protocol") or "TCP"  # the CRD's default
    if proto not in PROTOCOLS:
        raise ctx.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
    return proto


def _anp_port(ctx: _Ctx, v: Any, path: str) -> TierPort:
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


def _tier_rule(ctx: _Ctx, v: Any, path: str, fl: _Flavour, egress: bool) -> TierRule:
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


def _cluster_policy(ctx: _Ctx, obj: dict) -> ClusterPolicy:
    fl = _FLAVOURS[ctx.kind]
    ctx.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    name, _, _ = _meta(ctx, obj, namespaced=False)
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


# --- built-in kinds ---------------------------------------------------------------------

def _namespace(ctx: _Ctx, obj: dict) -> Namespace:
    name, _, meta = _meta(ctx, obj, namespaced=False)
    return Namespace(name=name, labels=ctx.labels(meta.get("labels"), "metadata.labels"))


def _pod(ctx: _Ctx, obj: dict) -> Pod:
    name, ns, meta = _meta(ctx, obj, namespaced=True)
    spec = ctx.mapping(obj.get("spec"), "spec")
    status = ctx.mapping(obj.get("status"), "status")
    annotations = ctx.mapping(meta.get("annotations"), "metadata.annotations")
    annotations = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    ports = []
    for ci, c in enumerate(ctx.sequence(spec.get("containers"), "spec.containers")):
        c = ctx.mapping(c, f"spec.containers[{ci}]")
        for pi, p in enumerate(ctx.sequence(c.get("ports"), f"spec.containers[{ci}].ports")):
            path = f"spec.containers[{ci}].ports[{pi}]"
            p = ctx.mapping(p, path)
            if not p.get("name"):
                continue  # only named ports matter: policies refer to them by name
            proto = p.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise ctx.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
            ports.append(NamedPort(name=ctx.string(p["name"], f"{path}.name"),
                                   port=ctx.integer(p.get("containerPort"), f"{path}.containerPort",
                                                    1, 65535),
                                   protocol=proto))
    ips: list[str] = []
    pod_ips = ctx.sequence(status.get("podIPs"), "status.podIPs")
    if pod_ips:
        for i, entry in enumerate(pod_ips):
            entry = ctx.mapping(entry, f"status.podIPs[{i}]")
            ips.append(ctx.address(entry.get("ip"), f"status.podIPs[{i}].ip"))
    elif status.get("podIP"):
        ips.append(ctx.address(status["podIP"], "status.podIP"))
    # A finished pod's address may already belong to a new pod: it must not match policy.
    finished = status.get("phase") in ("Succeeded", "Failed")
    if finished:
        ips = []
    return Pod(
        namespace=ns, name=name,
        labels=ctx.labels(meta.get("labels"), "metadata.labels"),
        node=ctx.string(spec.get("nodeName"), "spec.nodeName"),
        ips=tuple(ips), ports=tuple(ports),
        annotations=model.labels_of({str(k): str(v) for k, v in annotations.items()}),
        host_network=ctx.boolean(spec.get("hostNetwork"), "spec.hostNetwork"),
        uid=ctx.string(meta.get("uid"), "metadata.uid"),
        finished=finished,
    )


def _node(ctx: _Ctx, obj: dict) -> Node:
    name, _, meta = _meta(ctx, obj, namespaced=False)
    ann = ctx.mapping(meta.get("annotations"), "metadata.annotations")
    labels = ctx.mapping(meta.get("labels"), "metadata.labels")
    spec = ctx.mapping(obj.get("spec"), "spec")
    status = ctx.mapping(obj.get("status"), "status")

    def a(key: str) -> str:
        return ctx.string(ann.get(key), f"metadata.annotations[{key}]")

    internal: dict[int, str] = {}
    for i, addr in enumerate(ctx.sequence(status.get("addresses"), "status.addresses")):
        addr = ctx.mapping(addr, f"status.addresses[{i}]")
        if addr.get("type") == "InternalIP":
            try:
                ip = ipaddress.ip_address(addr.get("address", ""))
            except ValueError:
                continue
            internal.setdefault(ip.version, f"{ip}/{ip.max_prefixlen}")
    ip = (ctx.interface(a(ANN_IPV4), f"metadata.annotations[{ANN_IPV4}]", 4) if a(ANN_IPV4)
          else internal.get(4, ""))
    ip6 = (ctx.interface(a(ANN_IPV6), f"metadata.annotations[{ANN_IPV6}]", 6) if a(ANN_IPV6)
           else internal.get(6, ""))
    as_number = (ctx.integer(a(ANN_AS), f"metadata.annotations[{ANN_AS}]", 1, MAX_AS, from_str=True)
                 if a(ANN_AS) else None)
    pod_cidrs = ctx.sequence(spec.get("podCIDRs"), "spec.podCIDRs")
    if not pod_cidrs and spec.get("podCIDR"):
        pod_cidrs = [spec["podCIDR"]]
    pod_cidrs = [ctx.cidr(c, f"spec.podCIDRs[{i}]") for i, c in enumerate(pod_cidrs)]
    vxlan_addr = a(ANN_VXLAN_ADDR)
    if vxlan_addr:
        vxlan_addr = ctx.address(vxlan_addr, f"metadata.annotations[{ANN_VXLAN_ADDR}]")
    vxlan_mac = a(ANN_VXLAN_MAC)
    if vxlan_mac and not _MAC.match(vxlan_mac):
        raise ctx.fail(f"metadata.annotations[{ANN_VXLAN_MAC}]", f"{vxlan_mac!r} is not a MAC address")
    ipip_addr = a(ANN_IPIP_ADDR)
    if ipip_addr:
        ipip_addr = ctx.address(ipip_addr, f"metadata.annotations[{ANN_IPIP_ADDR}]")
    rr = a(ANN_RR_CLUSTER) or ctx.string(labels.get(ANN_RR_CLUSTER), f"metadata.labels[{ANN_RR_CLUSTER}]")
    if rr:
        ctx.address(rr, f"metadata.annotations[{ANN_RR_CLUSTER}]")  # BIRD wants an IPv4-shaped id
    return Node(
        name=name, ip=ip, ip6=ip6, as_number=as_number, pod_cidrs=tuple(pod_cidrs),
        vxlan_tunnel_addr=vxlan_addr, vxlan_tunnel_mac=vxlan_mac.lower(),
        ipip_tunnel_addr=ipip_addr, labels=ctx.labels(labels, "metadata.labels"),
        route_reflector_cluster_id=rr, ip_from_status=bool(ip) and not a(ANN_IPV4),
    )


# --- tortie's own kinds -----------------------------------------------------------------

def _own_spec(ctx: _Ctx, obj: dict, fields: tuple[str, ...]) -> tuple[str, dict, dict]:
    ctx.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec"))
    meta = ctx.mapping(obj.get("metadata"), "metadata")
    spec = ctx.mapping(obj.get("spec"), "spec", fields)
    return ctx.string(meta.get("name"), "metadata.name"), meta, spec


def _ip_pool(ctx: _Ctx, obj: dict) -> IPPool:
    name, _, spec = _own_spec(ctx, obj, ("cidr", "blockSize", "mode", "crossSubnet",
                                         "natOutgoing", "disabled"))
    if not name:
        raise ctx.fail("metadata.name", "is required")
    cidr = ctx.cidr(spec.get("cidr"), "spec.cidr")
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError:
        raise ctx.fail("spec.cidr", f"{cidr} has host bits set") from None
    bs = spec.get("blockSize")
    block_size = (model.DEFAULT_BLOCK_SIZE if net.version == 4 else 122) if bs is None else \
        ctx.integer(bs, "spec.blockSize", 0, net.max_prefixlen)
    if block_size < net.prefixlen:
        raise ctx.fail("spec.blockSize", f"{block_size} is shorter than the pool prefix /{net.prefixlen}")
    mode = spec.get("mode") or "bgp"
    if mode not in POOL_MODES:
        raise ctx.fail("spec.mode", f"{mode!r} is not one of {', '.join(POOL_MODES)}")
    cross = ctx.boolean(spec.get("crossSubnet"), "spec.crossSubnet")
    if cross and mode not in ("vxlan", "ipip"):
        raise ctx.fail("spec.crossSubnet", f"only applies to mode vxlan or ipip, not {mode}")
    return IPPool(name=name, cidr=cidr, block_size=block_size, mode=mode, cross_subnet=cross,
                  nat_outgoing=ctx.boolean(spec.get("natOutgoing"), "spec.natOutgoing"),
                  disabled=ctx.boolean(spec.get("disabled"), "spec.disabled"))


def _bgp_peer(ctx: _Ctx, obj: dict) -> BGPPeer:
    name, _, spec = _own_spec(ctx, obj, ("peerIP", "asNumber", "node", "passwordFile", "password"))
    if not name:
        raise ctx.fail("metadata.name", "is required")
    if "password" in spec:
        # Calico's secretKeyRef would need the agent to read Secrets; tortie keeps its RBAC
        # read-only on pods/namespaces/nodes/policies and BGPPeers live in etcd.
        raise ctx.fail("spec.password", "is not supported: put the password in a file on the nodes (e.g. a "
                                        "Secret mounted into the tortie-node pod) and set spec.passwordFile")
    pw_file = ctx.string(spec.get("passwordFile"), "spec.passwordFile")
    if pw_file and not pw_file.startswith("/"):
        raise ctx.fail("spec.passwordFile", f"must be an absolute path on the node, not {pw_file!r}")
    if '"' in pw_file or "\n" in pw_file:
        raise ctx.fail("spec.passwordFile", "must not contain quotes or newlines")
    return BGPPeer(name=name, peer_ip=ctx.address(spec.get("peerIP"), "spec.peerIP"),
                   as_number=ctx.integer(spec.get("asNumber"), "spec.asNumber", 1, MAX_AS),
                   node=ctx.string(spec.get("node"), "spec.node"), password_file=pw_file)


def wep_name(node: str, namespace: str, pod: str) -> str:
    """metadata.name of a WorkloadEndpoint object."""
    return f"{node}.{namespace}.{pod}"


def _workload_endpoint(ctx: _Ctx, obj: dict) -> WorkloadEndpoint:
    name, meta, spec = _own_spec(ctx, obj, ("node", "namespace", "pod", "containerID", "iface",
                                            "ips", "mac"))
    node = ctx.string(spec.get("node"), "spec.node", required=True)
    ns = ctx.string(spec.get("namespace"), "spec.namespace", required=True)
    pod = ctx.string(spec.get("pod"), "spec.pod", required=True)
    # Node names may contain dots, so the name cannot be split; it must agree with spec.
    if name and name != wep_name(node, ns, pod):
        raise ctx.fail("metadata.name", f"{name!r} must be {wep_name(node, ns, pod)!r} "
                       "(<node>.<namespace>.<pod> from spec)")
    if meta.get("namespace") and meta["namespace"] != ns:
        raise ctx.fail("metadata.namespace", f"{meta['namespace']!r} differs from spec.namespace {ns!r}")
    mac = ctx.string(spec.get("mac"), "spec.mac")
    if mac and not _MAC.match(mac):
        raise ctx.fail("spec.mac", f"{mac!r} is not a MAC address")
    ips = tuple(ctx.address(ip, f"spec.ips[{i}]")
                for i, ip in enumerate(ctx.sequence(spec.get("ips"), "spec.ips")))
    return WorkloadEndpoint(namespace=ns, pod=pod, node=node,
                            container_id=ctx.string(spec.get("containerID"), "spec.containerID"),
                            iface=ctx.string(spec.get("iface"), "spec.iface"), ips=ips,
                            mac=mac.lower())


def block_name(cidr: str) -> str:
    """metadata.name of a BlockAffinity ("10.65.1.0/26" -> "10.65.1.0-26")."""
    return cidr.replace("/", "-")


def _block_affinity(ctx: _Ctx, obj: dict) -> BlockAffinity:
    name, _, spec = _own_spec(ctx, obj, ("cidr", "node", "pool"))
    cidr = ctx.cidr(spec.get("cidr"), "spec.cidr")
    try:
        ipaddress.ip_network(cidr)
    except ValueError:
        raise ctx.fail("spec.cidr", f"{cidr} has host bits set") from None
    if name and name != block_name(cidr):
        raise ctx.fail("metadata.name", f"{name!r} must be {block_name(cidr)!r} (the cidr, '/' as '-')")
    return BlockAffinity(cidr=cidr, node=ctx.string(spec.get("node"), "spec.node", required=True),
                         pool=ctx.string(spec.get("pool"), "spec.pool"))


_FROM: dict[str, Callable[[_Ctx, dict], Record]] = {
    "Pod": _pod, "Namespace": _namespace, "Node": _node, "NetworkPolicy": _network_policy,
    "IPPool": _ip_pool, "BGPPeer": _bgp_peer, "WorkloadEndpoint": _workload_endpoint,
    "BlockAffinity": _block_affinity, "ClusterNetworkPolicy": _cluster_policy,
    "AdminNetworkPolicy": _cluster_policy, "BaselineAdminNetworkPolicy": _cluster_policy,
}


def from_k8s(obj: dict, kind: str | None = None) -> Record:
    """The record for a Kubernetes-shaped object. `kind` is for list items, which the API
    server sends without their own kind/apiVersion. Raises ConvertError."""
    if not isinstance(obj, dict):
        raise ConvertError(f"object must be a mapping, got {type(obj).__name__}")
    kind = obj.get("kind") or kind
    if not kind:
        raise ConvertError("object has no kind")
    ctx = _Ctx(str(kind), obj)
    if kind not in _FROM:
        raise ctx.fail("kind", f"{kind!r} is not one of {', '.join(sorted(_FROM))}")
    api = obj.get("apiVersion")
    if api and api != API_VERSION[kind]:
        raise ctx.fail("apiVersion", f"{api!r} is not {API_VERSION[kind]!r}")
    try:
        return _FROM[kind](ctx, obj)
    except ConvertError:
        raise
    except (TypeError, AttributeError, KeyError) as e:  # shapes the checks above missed
        raise ctx.fail("", f"malformed object ({type(e).__name__}: {e})") from None


def kind_of(record: Record) -> str:
    return model.KIND_OF[type(record)]


def key_from_k8s(obj: dict, kind: str | None = None) -> str:
    """The model key (record.key) an object has, without converting it: deletions of
    objects that do not convert any more still find the record they replace."""
    kind = obj.get("kind") or kind
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    if kind in ("Pod", "NetworkPolicy"):
        return f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"
    if kind == "WorkloadEndpoint":
        return f"{spec.get('node', '')}/{spec.get('namespace', '')}/{spec.get('pod', '')}"
    if kind == "BlockAffinity":
        return spec.get("cidr") or "/".join(str(meta.get("name", "")).rsplit("-", 1))
    return str(meta.get("name", ""))


# --- records -> objects -----------------------------------------------------------------

def _selector_k8s(sel: LabelSelector) -> dict:
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
        out["podSelector"] = _selector_k8s(p.pod_selector)
    if p.namespace_selector is not None:
        out["namespaceSelector"] = _selector_k8s(p.namespace_selector)
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


def _tier_peer_k8s(p: TierPeer) -> dict:
    if p.namespaces is not None:
        return {"namespaces": _selector_k8s(p.namespaces)}
    if p.pods is not None:
        return {"pods": {"namespaceSelector": _selector_k8s(p.pods.namespaces),
                         "podSelector": _selector_k8s(p.pods.pods)}}
    if p.nodes is not None:
        return {"nodes": _selector_k8s(p.nodes)}
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


def _cluster_policy_k8s(r: ClusterPolicy) -> dict:
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
    return _obj(r.kind, r.name, spec)


def _obj(kind: str, name: str, spec: dict | None = None, namespace: str = "",
         **meta: Any) -> dict:
    m: dict[str, Any] = {"name": name}
    if namespace:
        m["namespace"] = namespace
    m.update({k: v for k, v in meta.items() if v})
    out: dict[str, Any] = {"apiVersion": API_VERSION[kind], "kind": kind, "metadata": m}
    if spec is not None:
        out["spec"] = spec
    return out


def to_k8s(record: Record) -> dict:
    """The Kubernetes-shaped object for a record (the shape etcd stores)."""
    r = record
    if isinstance(r, Namespace):
        return _obj("Namespace", r.name, labels=dict(r.labels))
    if isinstance(r, Pod):
        spec: dict[str, Any] = {"containers": [{"name": "main", "ports": [
            {"name": p.name, "containerPort": p.port, "protocol": p.protocol} for p in r.ports]}]}
        if r.node:
            spec["nodeName"] = r.node
        if r.host_network:
            spec["hostNetwork"] = True
        o = _obj("Pod", r.name, spec, r.namespace, uid=r.uid, labels=dict(r.labels),
                 annotations=dict(r.annotations))
        o["status"] = ({"podIP": r.ips[0], "podIPs": [{"ip": ip} for ip in r.ips]} if r.ips else {})
        if r.finished:  # the model keeps only that the pod ended, not how
            o["status"]["phase"] = "Succeeded"
        return o
    if isinstance(r, Node):
        ann = {ANN_IPV4: "" if r.ip_from_status else r.ip, ANN_IPV6: r.ip6,
               ANN_AS: str(r.as_number) if r.as_number is not None else "",
               ANN_VXLAN_ADDR: r.vxlan_tunnel_addr, ANN_VXLAN_MAC: r.vxlan_tunnel_mac,
               ANN_IPIP_ADDR: r.ipip_tunnel_addr, ANN_RR_CLUSTER: r.route_reflector_cluster_id}
        spec = {}
        if r.pod_cidrs:
            spec = {"podCIDR": r.pod_cidrs[0], "podCIDRs": list(r.pod_cidrs)}
        o = _obj("Node", r.name, spec, labels=dict(r.labels),
                 annotations={k: v for k, v in ann.items() if v})
        if r.ip_from_status:
            o["status"] = {"addresses": [{"type": "InternalIP", "address": r.address}]}
        return o
    if isinstance(r, NetworkPolicy):
        spec = {"podSelector": _selector_k8s(r.pod_selector), "policyTypes": list(r.policy_types)}
        if r.ingress:
            spec["ingress"] = [_rule_k8s(x, "from") for x in r.ingress]
        if r.egress:
            spec["egress"] = [_rule_k8s(x, "to") for x in r.egress]
        return _obj("NetworkPolicy", r.name, spec, r.namespace)
    if isinstance(r, ClusterPolicy):
        return _cluster_policy_k8s(r)
    if isinstance(r, IPPool):
        return _obj("IPPool", r.name, {"cidr": r.cidr, "blockSize": r.block_size, "mode": r.mode,
                                       "crossSubnet": r.cross_subnet, "natOutgoing": r.nat_outgoing,
                                       "disabled": r.disabled})
    if isinstance(r, BGPPeer):
        spec = {"peerIP": r.peer_ip, "asNumber": r.as_number}
        if r.node:
            spec["node"] = r.node
        if r.password_file:
            spec["passwordFile"] = r.password_file
        return _obj("BGPPeer", r.name, spec)
    if isinstance(r, WorkloadEndpoint):
        return _obj("WorkloadEndpoint", wep_name(r.node, r.namespace, r.pod),
                    {"node": r.node, "namespace": r.namespace, "pod": r.pod,
                     "containerID": r.container_id, "iface": r.iface, "ips": list(r.ips),
                     "mac": r.mac})
    if isinstance(r, BlockAffinity):
        return _obj("BlockAffinity", block_name(r.cidr), {"cidr": r.cidr, "node": r.node, "pool": r.pool})
    raise TypeError(f"not a model record: {r!r}")
