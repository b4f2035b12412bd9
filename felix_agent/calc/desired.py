"""Desired dataplane state: what the pure calc produces and the drivers reconcile.

The calc never touches the kernel; drivers never compute policy.  These types are the
whole interface between the two halves of the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# table -> chain name -> rule bodies, each the text after "-A <chain> " in iptables-restore
# syntax (e.g. '-m set --match-set cali40s:abc src -j RETURN').  Only chains named
# cali-* are ours; the driver adds a content-derived comment id to each rule itself.
Chains = dict[str, dict[str, tuple[str, ...]]]


HOOK_POSITIONS = ("top", "bottom")


@dataclass(frozen=True)
class Hook:
    """A jump from a built-in chain to one of ours, kept at the top of the built-in chain
    or, for position "bottom", as its last rule (after other writers' rules: kube-proxy's
    REJECT for a Service without endpoints must see a packet our policy allowed)."""

    table: str  # "filter" | "nat" | "raw" | "mangle"
    builtin: str  # "INPUT", "FORWARD", ...
    target: str  # "cali-INPUT"
    position: str = "top"


@dataclass(frozen=True)
class IpSet:
    name: str  # <= 31 chars, e.g. "cali40s:<hash>"
    members: frozenset[str]
    type: str = "hash:net"
    family: str = "inet"  # "inet6" for IPv6 sets


@dataclass(frozen=True)
class Route:
    dst: str  # "10.65.1.0/26"
    dev: str = ""  # "" lets the kernel pick (with gateway)
    gateway: str = ""
    onlink: bool = False
    scope: str = "universe"  # "link" for local pod routes
    type: str = "unicast"  # "blackhole" | "unreachable" for local blocks
    src: str = ""


@dataclass(frozen=True)
class FDBEntry:
    """VXLAN: remote VTEP MAC reachable via the remote node's underlay address."""

    mac: str
    dst: str
    dev: str = "vxlan.calico"


@dataclass(frozen=True)
class Neighbor:
    ip: str
    mac: str
    dev: str = "vxlan.calico"


@dataclass
class DesiredState:
    chains: Chains = field(default_factory=dict)
    hooks: tuple[Hook, ...] = ()
    ipsets: dict[str, IpSet] = field(default_factory=dict)
    routes: frozenset[Route] = frozenset()
    # IPv6 iptables (ip6tables): today only the raw table's loopback guard.
    chains6: Chains = field(default_factory=dict)
    hooks6: tuple[Hook, ...] = ()
