"""Plain typed records of the cluster, as the calculation sees it.

Every record is a frozen dataclass with value equality so the calc can compare an old
and a new version and do nothing when they are equal.  Collections are tuples (or
frozensets) for the same reason.  Records know nothing about where they came from:
both datastores (kubernetes API, etcd) build them with felix_agent.datastore.convert.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Union

# Kinds a datastore emits, in the order a fresh sync should deliver them (namespaces
# before the pods that live in them, pools before blocks).
KINDS = (
    "IPPool",
    "Node",
    "BGPPeer",
    "Namespace",
    "Pod",
    "WorkloadEndpoint",
    "NetworkPolicy",
    "ClusterNetworkPolicy",
    "AdminNetworkPolicy",
    "BaselineAdminNetworkPolicy",
    "BlockAffinity",
)
Kind = Literal[
    "IPPool", "Node", "BGPPeer", "Namespace", "Pod", "WorkloadEndpoint", "NetworkPolicy",
    "ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy", "BlockAffinity",
]

DEFAULT_AS = 64512
DEFAULT_BLOCK_SIZE = 26
DEFAULT_BLOCK_SIZE_V6 = 122


# --- label selectors ------------------------------------------------------------------

@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes LabelSelector. The empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str] | tuple[tuple[str, str], ...]) -> bool:
        labels = dict(labels)
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In":
                if not present or labels[req.key] not in req.values:
                    return False
            elif req.operator == "NotIn":
                if present and labels[req.key] in req.values:
                    return False
            elif req.operator == "Exists":
                if not present:
                    return False
            elif req.operator == "DoesNotExist":
                if present:
                    return False
            else:  # the converter rejects unknown operators; this guards hand-built records
                raise ValueError(f"unknown selector operator {req.operator!r}")
        return True

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def canonical(self) -> str:
        """A stable text form, used to name ipsets and to share them between rules."""
        parts = [f"{k}=={v}" for k, v in sorted(self.match_labels)]
        for r in sorted(self.match_expressions, key=lambda r: (r.key, r.operator, r.values)):
            parts.append(f"{r.key} {r.operator} ({','.join(sorted(r.values))})")
        return " && ".join(parts) or "all()"


Labels = tuple[tuple[str, str], ...]


def labels_of(d: dict[str, str] | None) -> Labels:
    return tuple(sorted((d or {}).items()))


# --- cluster objects --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Labels = ()

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class NamedPort:
    name: str
    port: int
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod as the API server (or tortiectl in etcd mode) describes it."""

    namespace: str
    name: str
    labels: Labels = ()
    node: str = ""
    ips: tuple[str, ...] = ()  # plain addresses, no prefix ("10.244.1.5")
    ports: tuple[NamedPort, ...] = ()
    annotations: Labels = ()
    host_network: bool = False
    uid: str = ""
    finished: bool = False  # phase Succeeded or Failed: its containers have all ended

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class WorkloadEndpoint:
    """What a CNI ADD wired on a node: written by the agent that served the ADD."""

    namespace: str
    pod: str
    node: str
    container_id: str
    iface: str  # host side, cali...
    ips: tuple[str, ...]  # plain addresses
    mac: str = ""

    @property
    def key(self) -> str:
        return f"{self.node}/{self.namespace}/{self.pod}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A pod with its network: the join of Pod and WorkloadEndpoint the calc works on."""

    namespace: str
    pod: str
    node: str
    ips: tuple[str, ...]
    labels: Labels = ()
    iface: str = ""
    ports: tuple[NamedPort, ...] = ()
    floating_ips: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass(frozen=True)
class Node:
    name: str
    ip: str = ""  # primary IPv4 with prefix, e.g. "192.168.100.11/24" (subnet matters for crossSubnet)
    ip6: str = ""
    as_number: int | None = None  # None: the cluster default
    pod_cidrs: tuple[str, ...] = ()  # kubernetes mode: Node.spec.podCIDRs
    vxlan_tunnel_addr: str = ""
    vxlan_tunnel_mac: str = ""
    ipip_tunnel_addr: str = ""
    # vxlan-v6.calico's VTEP (IPv6 pools in vxlan mode), as Calico keeps a second one
    vxlan_tunnel_addr6: str = ""
    vxlan_tunnel_mac6: str = ""
    labels: Labels = ()
    route_reflector_cluster_id: str = ""  # non-empty: this node is a route reflector
    # ip is the Node's status InternalIP (kubernetes mode, no annotation): the API gives no
    # prefix, so it reads /32 until the node itself supplies its uplink's (routes.with_own_prefix)
    ip_from_status: bool = False

    @property
    def key(self) -> str:
        return self.name

    @cached_property  # asked ~20 times per node per routing pass (sessions, subnets, routes)
    def address(self) -> str:
        """The IPv4 address without prefix."""
        return self.ip.split("/")[0] if self.ip else ""

    @cached_property
    def address6(self) -> str:
        """The IPv6 address without prefix."""
        return self.ip6.split("/")[0] if self.ip6 else ""

    def address_of(self, version: int) -> str:
        """The node's address of IP version `version` ("" when it has none)."""
        return self.address if version == 4 else self.address6

    def vtep_of(self, version: int) -> tuple[str, str]:
        """(VTEP address, VTEP MAC) of the vxlan device of IP version `version`."""
        if version == 4:
            return self.vxlan_tunnel_addr.split("/")[0], self.vxlan_tunnel_mac
        return self.vxlan_tunnel_addr6.split("/")[0], self.vxlan_tunnel_mac6


RoutingMode = Literal["bgp", "direct", "vxlan", "ipip"]


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: str
    block_size: int = DEFAULT_BLOCK_SIZE
    mode: RoutingMode = "bgp"
    cross_subnet: bool = False  # vxlan/ipip only: encapsulate only between subnets
    nat_outgoing: bool = False
    disabled: bool = False

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True)
class BGPPeer:
    """An explicit BGP peer (e.g. a ToR switch). node "" means every node peers with it."""

    name: str
    peer_ip: str
    as_number: int
    node: str = ""
    # A file on the node holding the session's TCP MD5 password (never the password itself:
    # the datastore, the calc and the logs only ever see this path).
    password_file: str = ""

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True)
class BlockAffinity:
    """A block of a pool owned by one node."""

    cidr: str
    node: str
    pool: str = ""

    @property
    def key(self) -> str:
        return self.cidr


# --- network policy (networking.k8s.io/v1, complete) -----------------------------------

Protocol = Literal["TCP", "UDP", "SCTP"]


@dataclass(frozen=True)
class IPBlock:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyPeer:
    """One entry of from/to. Exactly one of ip_block or (pod_selector and/or
    namespace_selector) is set, as the API requires."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    protocol: Protocol = "TCP"
    port: Union[int, str, None] = None  # None: all ports; str: a named port
    end_port: int | None = None


@dataclass(frozen=True)
class PolicyRule:
    """An ingress or egress rule. Empty peers: every source/destination.
    Empty ports: every port."""

    peers: tuple[PolicyPeer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = field(default_factory=LabelSelector)
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    # Always filled in by the converter (datastore/convert) with the API's defaulting: Ingress, plus Egress
    # when the spec has egress rules.
    policy_types: tuple[Literal["Ingress", "Egress"], ...] = ("Ingress",)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @cached_property  # asked for every policy of every pass; a sha1 each time added up
    def id(self) -> str:
        """Short stable id used in chain names (cali-pi-<id>), within iptables' 28 chars."""
        return hashlib.sha1(self.key.encode()).hexdigest()[:16]


# --- tiered cluster policy (policy.networking.k8s.io: ClusterNetworkPolicy v1alpha2, and
# AdminNetworkPolicy / BaselineAdminNetworkPolicy v1alpha1 mapped onto the same tiers) ---

Tier = Literal["Admin", "Baseline"]
TierAction = Literal["Accept", "Deny", "Pass"]
TIERS: tuple[Tier, ...] = ("Admin", "Baseline")
TIER_ACTIONS: tuple[TierAction, ...] = ("Accept", "Deny", "Pass")


@dataclass(frozen=True)
class NamespacedPods:
    """Pods picked by `pods` within the namespaces `namespaces` picks (both may be empty =
    everything)."""

    namespaces: LabelSelector = field(default_factory=LabelSelector)
    pods: LabelSelector = field(default_factory=LabelSelector)


@dataclass(frozen=True)
class TierPeer:
    """A subject, or one entry of a rule's from/to. Exactly one field is set (the API's
    MinProperties=MaxProperties=1): every pod of some namespaces, some pods of some
    namespaces, or (egress only) IP networks or the nodes a label selector picks."""

    namespaces: LabelSelector | None = None
    pods: NamespacedPods | None = None
    networks: tuple[str, ...] = ()  # CIDRs as written
    nodes: LabelSelector | None = None


@dataclass(frozen=True)
class TierPort:
    """A destination port match: a number or range of one protocol, every port of one
    protocol, or a container port name (protocol None: the name resolves on the
    destination pod to its own number and protocol)."""

    protocol: Protocol | None = "TCP"
    port: int | None = None  # None with a protocol: every port of it
    end_port: int | None = None  # a range port..end_port
    name: str = ""


@dataclass(frozen=True)
class TierRule:
    """Traffic from/to any of `peers` on any of `ports` (empty: every port) gets
    `action`; the first matching rule of the first matching policy decides."""

    action: TierAction
    peers: tuple[TierPeer, ...]
    ports: tuple[TierPort, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class ClusterPolicy:
    """What the three policy.networking.k8s.io kinds have in common.  The subclasses only
    say which kind an object was (so both datastores keep them apart and write them back
    as they came); the calc treats them alike through `tier` and `precedence`."""

    name: str
    tier: Tier
    priority: int  # 0..1000, lower first; a BaselineAdminNetworkPolicy has none: BANP_PRIORITY
    subject: TierPeer
    ingress: tuple[TierRule, ...] = ()
    egress: tuple[TierRule, ...] = ()

    @property
    def key(self) -> str:
        return self.name

    @property
    def kind(self) -> str:
        return KIND_OF[type(self)]

    @property
    def precedence(self) -> tuple[int, int, str]:
        """Sort key within a tier.  The API leaves equal priorities to the implementation:
        ties go CNP before ANP, then by name, so every node picks the same order."""
        return (self.priority, _KIND_RANK[self.kind], self.name)

    @cached_property
    def id(self) -> str:
        """Short stable id used in chain names (cali-ci-<id>, cali-co-<id>)."""
        return hashlib.sha1(f"{self.kind}/{self.name}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClusterNetworkPolicy(ClusterPolicy):
    pass


@dataclass(frozen=True)
class AdminNetworkPolicy(ClusterPolicy):
    pass


@dataclass(frozen=True)
class BaselineAdminNetworkPolicy(ClusterPolicy):
    pass


BANP_PRIORITY = 1001  # the one BANP (it has no priority) goes after every Baseline CNP (0..1000)
_KIND_RANK = {"ClusterNetworkPolicy": 0, "AdminNetworkPolicy": 1, "BaselineAdminNetworkPolicy": 2}
CLUSTER_POLICY_KINDS = tuple(_KIND_RANK)


Record = Union[Namespace, Pod, WorkloadEndpoint, Node, IPPool, BGPPeer, BlockAffinity, NetworkPolicy,
               ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy]

KIND_OF: dict[type, str] = {
    Namespace: "Namespace",
    Pod: "Pod",
    WorkloadEndpoint: "WorkloadEndpoint",
    Node: "Node",
    IPPool: "IPPool",
    BGPPeer: "BGPPeer",
    BlockAffinity: "BlockAffinity",
    NetworkPolicy: "NetworkPolicy",
    ClusterNetworkPolicy: "ClusterNetworkPolicy",
    AdminNetworkPolicy: "AdminNetworkPolicy",
    BaselineAdminNetworkPolicy: "BaselineAdminNetworkPolicy",
}


# --- syncer events ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Update:
    """A record was created or changed (value set) or deleted (value None)."""

    kind: str
    key: str
    value: Record | None


@dataclass(frozen=True)
class SyncStatus:
    """in_sync=True after the initial list (or a relist) has been delivered completely;
    in_sync=False when the datastore connection is lost. Records already delivered stay
    valid while out of sync: the dataplane is kept as it is."""

    in_sync: bool
    reason: str = ""


Event = Union[Update, SyncStatus]
