"""The ipsets policy rules match on: what each set means, its name, its members.

A set is named by a hash of what it means (never of who uses it), so every rule of every
policy that means the same pods shares one set, and a label change moves members in and
out of sets while the chains that name them stay byte-for-byte the same.  Each meaning has
one set per IP family: "cali40..." (inet, the IPv4 members) for iptables and "cali60..."
(inet6, same hash, the IPv6 members) for ip6tables.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Union

from felix_agent.calc.desired import IpSet
from felix_agent.calc.names import (
    IPSET_NAME_MAX,
    NAMED_PORT_SET_PREFIX,
    NETS_SET_PREFIX,
    NODES_SET_PREFIX,
    SELECTOR_SET_PREFIX,
    family_set_name,
    ipset_family,
)
from felix_agent.calc.selectors import PeerSelector, SelectorIndex, addresses
from felix_agent.model import LabelSelector, Node

HASH_CHARS = 22  # 132 bits of sha256: collisions are not a practical concern


def hashed_name(prefix: str, meaning: str, family: int = 4) -> str:
    digest = hashlib.sha256(meaning.encode()).digest()
    # urlsafe base64 uses only [A-Za-z0-9_-]: valid in ipset and iptables names.
    name = family_set_name(prefix, family) + base64.urlsafe_b64encode(digest).decode()[:HASH_CHARS]
    assert len(name) <= IPSET_NAME_MAX, name
    return name


@dataclass(frozen=True)
class SelectorSet:
    """hash:net of the addresses of IP `family` of the pods a selector picks."""

    sel: PeerSelector
    family: int = 4

    @cached_property  # hashing is the costly part of a set; names are asked often
    def name(self) -> str:
        return hashed_name(SELECTOR_SET_PREFIX, self.sel.canonical(), self.family)

    type = "hash:net"


@dataclass(frozen=True)
class NamedPortSet:
    """hash:ip,port of "ip,proto:port" for every selected pod whose container declares
    port `port_name` with `protocol` (each pod resolves the name to its own number)."""

    sel: PeerSelector
    port_name: str
    protocol: str  # "TCP" | "UDP" | "SCTP", or "" for any (cluster policies' named ports)
    family: int = 4

    @cached_property
    def name(self) -> str:
        return hashed_name(NAMED_PORT_SET_PREFIX,
                           f"{self.sel.canonical()}; port={self.port_name}/{self.protocol}", self.family)

    type = "hash:ip,port"


@dataclass(frozen=True)
class NetSet:
    """hash:net of fixed CIDRs (an ipBlock's `except` list)."""

    cidrs: tuple[str, ...]  # normalised and sorted, see net_members; all of `family`
    family: int = 4

    @cached_property
    def name(self) -> str:
        return hashed_name(NETS_SET_PREFIX, ",".join(self.cidrs), self.family)

    type = "hash:net"


@dataclass(frozen=True)
class NodeSet:
    """hash:net of the addresses of IP `family` of the nodes a label selector picks (a
    cluster policy's `nodes` peer).  Its members come from the Node records (node_members),
    not from the endpoint index the other sets use."""

    nodes: LabelSelector
    family: int = 4

    @cached_property
    def name(self) -> str:
        return hashed_name(NODES_SET_PREFIX, self.nodes.canonical(), self.family)

    type = "hash:net"


SetSpec = Union[SelectorSet, NamedPortSet, NetSet, NodeSet]


def node_members(spec: NodeSet, nodes: Iterable[Node]) -> IpSet:
    ips = frozenset(ip for n in nodes if spec.nodes.matches(n.labels)
                    for ip in addresses([n.address, n.ip6.split("/")[0]], spec.family))
    return IpSet(name=spec.name, members=ips, type=spec.type, family=ipset_family(spec.family))


def net_members(cidrs: Iterable[str], family: int = 4) -> tuple[str, ...]:
    """CIDRs as `ipset save` lists them in a hash:net: host bits cleared, a host prefix
    (/32, /128) written as a plain address, and /0 (which hash:net refuses) as its two /1
    halves.  Raises ValueError on a malformed CIDR or one not of IP `family`."""
    out = set()
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        if net.version != family:
            raise ValueError(f"{cidr!r} is not an IPv{family} CIDR")
        nets = list(net.subnets(new_prefix=1)) if net.prefixlen == 0 else [net]
        for n in nets:
            out.add(str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n))
    return tuple(sorted(out, key=lambda s: ipaddress.ip_network(s)))


def set_members(spec: SetSpec, index: SelectorIndex) -> frozenset[str]:
    if isinstance(spec, SelectorSet):
        return index.members(spec.sel, spec.family)
    if isinstance(spec, NamedPortSet):
        return index.named_members(spec.sel, spec.port_name, spec.protocol, spec.family)
    if isinstance(spec, NodeSet):
        raise TypeError("a NodeSet's members come from the nodes: node_members")
    return frozenset(spec.cidrs)


def desired_ipset(spec: SetSpec, index: SelectorIndex) -> IpSet:
    return IpSet(name=spec.name, members=set_members(spec, index), type=spec.type, family=ipset_family(spec.family))
