"""Shared by the converters (felix_agent.datastore.convert): API versions, annotation keys,
the error, the small validators and the context that names an object's failing field.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
import re
from typing import Any, TypeVar

from felix_agent import model

T = TypeVar("T")

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
ANN_VXLAN_ADDR6 = "tortie.io/vxlan-tunnel-addr-v6"
ANN_VXLAN_MAC6 = "tortie.io/vxlan-tunnel-mac-v6"
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
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def is_svc_name(s: str) -> bool:
    return (len(s) <= 15 and bool(_SVC_NAME.match(s)) and "--" not in s
            and any(c.isalpha() for c in s))


# Label keys and values repeat across pods (app, tier, version...): each is checked once.
@functools.lru_cache(maxsize=1 << 14)
def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


@functools.lru_cache(maxsize=1 << 14)
def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


class Ctx:
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
            if not isinstance(k, str) or not is_label_key(k):
                raise self.fail(f"{path}", f"invalid label key {k!r}")
            if not isinstance(val, str) or not is_label_value(val):
                raise self.fail(f"{path}.{k}", f"invalid label value {val!r}")
        return shared(tuple(sorted(shared(kv) for kv in d.items())))

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


@functools.lru_cache(maxsize=1 << 16)
def shared(value: T) -> T:
    """The first equal value seen (of the last 65,536 asked for): 100,000 pods decoded from
    JSON carry 100,000 copies of each namespace, node name, label and port list, which one
    object each serves (at 100k pods ~650 bytes a pod).  Only for immutable values."""
    return value


def meta_of(ctx: Ctx, obj: dict, namespaced: bool) -> tuple[str, str, dict]:
    meta = ctx.mapping(obj.get("metadata"), "metadata")
    name = ctx.string(meta.get("name"), "metadata.name", required=True)
    ns = ""
    if namespaced:
        # kubectl puts objects without a namespace into "default"; do the same.
        ns = shared(ctx.string(meta.get("namespace"), "metadata.namespace") or "default")
    return name, ns, meta


def k8s_obj(kind: str, name: str, spec: dict | None = None, namespace: str = "",
         **meta: Any) -> dict:
    m: dict[str, Any] = {"name": name}
    if namespace:
        m["namespace"] = namespace
    m.update({k: v for k, v in meta.items() if v})
    out: dict[str, Any] = {"apiVersion": API_VERSION[kind], "kind": kind, "metadata": m}
    if spec is not None:
        out["spec"] = spec
    return out
