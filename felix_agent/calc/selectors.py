"""Which pods a policy's podSelector or a peer's namespaceSelector/podSelector means.

Kubernetes semantics:
- a policy's own podSelector picks pods in the policy's namespace;
- a peer with only podSelector picks pods in the POLICY's namespace;
- a peer with only namespaceSelector picks every pod of the matching namespaces;
- a peer with both picks the podSelector's pods within the matching namespaces;
- an empty selector ({}) matches everything.
Every namespace carries the immutable label kubernetes.io/metadata.name=<name> (the API
server adds it); it is added here too, so selectors on it work whatever the datastore.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterable, Mapping

from felix_agent.model import Endpoint, LabelSelector, Namespace, NetworkPolicy, PolicyPeer

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
MATCH_ALL = LabelSelector()


@dataclass(frozen=True)
class PeerSelector:
    """A set of pods: `pods` within either one namespace (`namespaces` None) or every
    namespace `namespaces` matches."""

    pods: LabelSelector = MATCH_ALL
    namespaces: LabelSelector | None = None
    namespace: str = ""  # used only when namespaces is None

    @classmethod
    def of_policy(cls, policy: NetworkPolicy) -> "PeerSelector":
        return cls(pods=policy.pod_selector, namespace=policy.namespace)

    @classmethod
    def of_peer(cls, peer: PolicyPeer, policy_namespace: str) -> "PeerSelector | None":
        """None for an ipBlock peer or a peer with no selector at all (malformed)."""
        if peer.ip_block is not None:
            return None
        if peer.namespace_selector is not None:
            return cls(pods=peer.pod_selector or MATCH_ALL, namespaces=peer.namespace_selector)
        if peer.pod_selector is not None:
            return cls(pods=peer.pod_selector, namespace=policy_namespace)
        return None

    def canonical(self) -> str:
        """Stable text naming this pod set: equal text, same pods (so ipsets are shared)."""
        scope = f"ns={self.namespace}" if self.namespaces is None else f"nssel={self.namespaces.canonical()}"
        return f"{scope}; pods={self.pods.canonical()}"


# Every pod in every namespace: the destination set of egress named ports without a
# selector peer (the port name resolves on whatever pod is the destination).
ALL_PODS = PeerSelector(pods=MATCH_ALL, namespaces=MATCH_ALL)


def namespace_labels(name: str, namespace: Namespace | None) -> dict[str, str]:
    labels = dict(namespace.labels) if namespace is not None else {}
    labels[NAMESPACE_NAME_LABEL] = name
    return labels


FAMILIES = (4, 6)  # every filter chain and set exists once per IP family
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def _is_family(ip: str, family: int) -> bool:
    # inet_pton takes exactly the addresses ipaddress takes (glibc refuses leading zeros
    # too) at a tenth of the cost and with no cache to outgrow: an LRU cache of 65,536
    # thrashed at 100k pods (25k parses for one named-port set).
    try:
        socket.inet_pton(_AF[family], ip)
    except (OSError, TypeError, ValueError):
        return False  # not an address of this family: nothing of the family can match it
    return True


def addresses(ips: Iterable[str], family: int) -> list[str]:
    """The addresses of IP `family` (4 or 6) among `ips`: each family's chains and sets see
    only their own (an IPv6 address has no IPv4 meaning, and the reverse).  Every pass asks
    this for every pod's addresses, so it is cheap: no ipaddress objects."""
    return [ip for ip in ips if _is_family(ip, family)]


def ipv4_addresses(ips: Iterable[str]) -> list[str]:
    """The IPv4 addresses among `ips`."""
    return addresses(ips, 4)


def port_members(ep: Endpoint, port_name: str, protocol: str, family: int = 4) -> list[str]:
    """An endpoint's members of the named-port set (port_name, protocol) of IP `family`:
    "ip,proto:port".  protocol "": the named port of any protocol (a cluster policy's named
    port names none)."""
    ports = [p for p in ep.ports if p.name == port_name and protocol in ("", p.protocol)]
    if not ports:
        return []
    ips = addresses(ep.ips, family)
    return [f"{ip},{p.protocol.lower()}:{p.port}" for p in ports for ip in ips]


class SelectorIndex:
    """Endpoints grouped by namespace with label dicts ready, and a cache of selections,
    so many policies with the same selectors cost one scan each."""

    def __init__(self, endpoints: Iterable[Endpoint], namespaces: Mapping[str, Namespace]):
        ns_by_name = {ns.name: ns for ns in namespaces.values()}
        self._by_ns: dict[str, list[tuple[Endpoint, dict[str, str]]]] = {}
        for ep in endpoints:
            self._by_ns.setdefault(ep.namespace, []).append((ep, dict(ep.labels)))
        # Namespaces named by pods count even before their Namespace record arrives.
        self._ns_labels = {name: namespace_labels(name, ns_by_name.get(name))
                           for name in set(ns_by_name) | set(self._by_ns)}
        self._cache: dict[PeerSelector, tuple[Endpoint, ...]] = {}
        self._members: dict[tuple[PeerSelector, int], frozenset[str]] = {}

    def select(self, sel: PeerSelector) -> tuple[Endpoint, ...]:
        hit = self._cache.get(sel)
        if hit is not None:
            return hit
        if sel.namespaces is None:
            names = [sel.namespace]
        else:
            names = sorted(n for n, labels in self._ns_labels.items() if sel.namespaces.matches(labels))
        out = []
        pods = sel.pods
        everything = pods.is_empty
        for name in names:
            for ep, labels in self._by_ns.get(name, ()):
                if everything or pods.matches(labels):
                    out.append(ep)
        result = tuple(out)
        self._cache[sel] = result
        return result

    def members(self, sel: PeerSelector, family: int = 4) -> frozenset[str]:
        """Addresses of IP `family` of the selected pods (plain, as ipset lists host members)."""
        hit = self._members.get((sel, family))
        if hit is None:
            hit = frozenset(ip for ep in self.select(sel) for ip in addresses(ep.ips, family))
            self._members[(sel, family)] = hit
        return hit

    def named_members(self, sel: PeerSelector, port_name: str, protocol: str, family: int = 4) -> frozenset[str]:
        """"ip,proto:port" of the selected pods that name a port `port_name`."""
        return frozenset(m for ep in self.select(sel) for m in port_members(ep, port_name, protocol, family))


def selector_members(sel: PeerSelector, endpoints: Iterable[Endpoint],
                     namespaces: Mapping[str, Namespace], family: int = 4) -> frozenset[str]:
    """One-off form of SelectorIndex(...).members(sel, family)."""
    return SelectorIndex(endpoints, namespaces).members(sel, family)
