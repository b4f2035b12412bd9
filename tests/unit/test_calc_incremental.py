"""The incremental policy calc (calc/incremental.py) against the from-scratch one
(filter.dataplane_state): after every event of seeded random sequences, both give the same
chains, hooks, ipsets and errors.  The events cover what moves endpoints between sets and
policies between nodes: pod and endpoint adds, label changes, moves between nodes, IP and
named-port changes, deletions, finished and host-network pods, duplicate or bad interface
names, namespace label changes and deletions, policies with every selector shape, cluster
policies of both tiers and all three kinds, pools and nodes."""
from __future__ import annotations

import random

import pytest

from felix_agent.calc.cluster import FLOATING_IPS_ANNOTATION, Cluster
from felix_agent.calc.filter import CalcConfig, dataplane_state
from felix_agent.calc.incremental import IncrementalCalc
from felix_agent.model import (
    BANP_PRIORITY,
    KIND_OF,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    NamespacedPods,
    TierPeer,
    TierPort,
    TierRule,
    IPBlock,
    IPPool,
    LabelSelector,
    NamedPort,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
    SelectorRequirement,
    Update,
    WorkloadEndpoint,
)
from tests.unit.test_calc_fixtures import iface_of

ME = "n0"
NODES = ("n0", "n1", "n2")
NAMESPACES = ("a", "b", "c")
KEYS = ("app", "tier", "team")
VALUES = ("x", "y", "z")


def labels(rng: random.Random) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({k: rng.choice(VALUES) for k in rng.sample(KEYS, rng.randint(0, 3))}.items()))


def selector(rng: random.Random) -> LabelSelector:
    shape = rng.randint(0, 3)
    if shape == 0:
        return LabelSelector()
    ml = tuple(sorted({rng.choice(KEYS): rng.choice(VALUES) for _ in range(rng.randint(1, 2))}.items()))
    if shape == 1:
        return LabelSelector(ml)
    op = rng.choice(("In", "NotIn", "Exists", "DoesNotExist"))
    vals = tuple(sorted(rng.sample(VALUES, 2))) if op in ("In", "NotIn") else ()
    exprs = (SelectorRequirement(rng.choice(KEYS), op, vals),)
    return LabelSelector(ml if shape == 3 else (), exprs)


def peer(rng: random.Random, dual: bool = False) -> PolicyPeer:
    shape = rng.randint(0, 3)
    if shape == 0:
        return PolicyPeer(pod_selector=selector(rng))
    if shape == 1:
        return PolicyPeer(namespace_selector=selector(rng))
    if shape == 2:
        return PolicyPeer(pod_selector=selector(rng), namespace_selector=selector(rng))
    if dual and rng.random() < 0.5:
        return PolicyPeer(ip_block=IPBlock("fd00::/16", ("fd00:1::/32",)))
    return PolicyPeer(ip_block=IPBlock("10.0.0.0/8", ("10.1.0.0/16",)))


def rule(rng: random.Random, dual: bool = False) -> PolicyRule:
    ports = rng.choice(((), (PolicyPort("TCP", 80),), (PolicyPort("TCP", "http"),),
                        (PolicyPort("UDP", "dns"), PolicyPort("TCP", 443))))
    return PolicyRule(peers=tuple(peer(rng, dual) for _ in range(rng.randint(0, 2))), ports=ports)


def policy(rng: random.Random, dual: bool = False) -> NetworkPolicy:
    types = rng.choice((("Ingress",), ("Egress",), ("Ingress", "Egress")))
    return NetworkPolicy(rng.choice(NAMESPACES), f"p{rng.randint(0, 5)}", selector(rng),
                         ingress=tuple(rule(rng, dual) for _ in range(rng.randint(0, 2))),
                         egress=tuple(rule(rng, dual) for _ in range(rng.randint(0, 2))),
                         policy_types=types)


def tier_peer(rng: random.Random, egress: bool, dual: bool = False) -> TierPeer:
    shape = rng.randint(0, 3 if egress else 1)
    if shape == 0:
        return TierPeer(namespaces=selector(rng))
    if shape == 1:
        return TierPeer(pods=NamespacedPods(selector(rng), selector(rng)))
    if shape == 2:
        return TierPeer(nodes=selector(rng))
    if dual:
        return TierPeer(networks=rng.choice((("10.0.0.0/24",), ("fd00::/64",), ("10.0.0.0/24", "fd00::/64"))))
    return TierPeer(networks=("10.0.0.0/24",))


def tier_rules(rng: random.Random, egress: bool, dual: bool = False) -> tuple[TierRule, ...]:
    out = []
    for _ in range(rng.randint(0, 2)):
        peers = tuple(tier_peer(rng, egress, dual) for _ in range(rng.randint(1, 2)))
        named = not any(p.networks or p.nodes is not None for p in peers)
        tports = rng.choice(((), (TierPort("TCP", 80),), (TierPort("UDP", 50, 60),))
                            + (((TierPort(None, name="http"),),) if named else ()))
        out.append(TierRule(rng.choice(("Accept", "Deny", "Pass")), peers, tports))
    return tuple(out)


def cluster_policy(rng: random.Random, dual: bool = False):
    subject = tier_peer(rng, False)
    ing, eg = tier_rules(rng, False, dual), tier_rules(rng, True, dual)
    roll = rng.random()
    if roll < 0.6:
        return ClusterNetworkPolicy(f"c{rng.randint(0, 3)}", rng.choice(("Admin", "Baseline")), rng.randint(0, 3),
                                    subject, ing, eg)
    if roll < 0.8:
        return AdminNetworkPolicy(f"a{rng.randint(0, 1)}", "Admin", rng.randint(0, 3), subject, ing, eg)
    return BaselineAdminNetworkPolicy("default", "Baseline", BANP_PRIORITY, subject, ing, eg)


def ports(rng: random.Random) -> tuple[NamedPort, ...]:
    return rng.choice(((), (NamedPort("http", 8080),), (NamedPort("http", 80), NamedPort("dns", 53, "UDP"))))


def addresses(rng: random.Random, dual: bool) -> tuple[str, ...]:
    """One IPv4 address; dual: IPv4, IPv6 or both (a few pods of an IPv6-only pool)."""
    ip = f"10.{rng.randint(0, 1)}.0.{rng.randint(1, 30)}"
    if not dual:
        return (ip,)
    ip6 = f"fd00:{rng.randint(0, 1)}::{rng.randint(1, 30):x}"
    return rng.choice(((ip, ip6), (ip, ip6), (ip6,), (ip,)))


def random_event(rng: random.Random, cluster: Cluster, dual: bool = False) -> Update:
    """One change to the cluster; dual: dual-stack and IPv6-only pods, ipBlocks and
    networks of both families, nodes with IPv6 addresses."""
    roll = rng.random()
    ns, name = rng.choice(NAMESPACES), f"pod{rng.randint(0, 11)}"
    ips = addresses(rng, dual)
    if roll < 0.35:
        ann = ((FLOATING_IPS_ANNOTATION, '["203.0.113.1"]'),) if rng.random() < 0.1 else ()
        rec = Pod(ns, name, labels(rng), node=rng.choice(NODES), ips=ips if rng.random() < 0.9 else (),
                  ports=ports(rng), annotations=ann, host_network=rng.random() < 0.05,
                  finished=rng.random() < 0.05)
    elif roll < 0.45 and cluster.pods:
        old = cluster.pods[rng.choice(sorted(cluster.pods))]
        rec = Pod(old.namespace, old.name, labels(rng), node=old.node, ips=old.ips, ports=old.ports)
    elif roll < 0.65:
        iface = iface_of(ns, name) if rng.random() < 0.9 else rng.choice(("cali-dup", "eth0-bad"))
        rec = WorkloadEndpoint(ns, name, rng.choice(NODES), f"c{rng.randint(0, 3)}", iface, ips)
    elif roll < 0.72:
        rec = policy(rng, dual)
    elif roll < 0.8:
        rec = cluster_policy(rng, dual)
    elif roll < 0.88:
        rec = Namespace(rng.choice(NAMESPACES), labels(rng))
    elif roll < 0.93:
        ip6 = f"fd10::{rng.randint(1, 9)}/64" if dual and rng.random() < 0.7 else ""
        rec = Node(rng.choice(NODES), ip=f"192.168.0.{rng.randint(1, 9)}/24", ip6=ip6, labels=labels(rng))
    else:
        rec = IPPool("pool", rng.choice(("10.0.0.0/16", "10.1.0.0/16")), nat_outgoing=rng.random() < 0.5)
    kind = KIND_OF[type(rec)]
    if rng.random() < 0.15:
        existing = _existing(cluster, kind)
        if existing:
            return Update(kind, rng.choice(existing), None)
    return Update(kind, rec.key, rec)


_TABLE = {"Pod": "pods", "WorkloadEndpoint": "workload_endpoints", "NetworkPolicy": "policies",
          "Namespace": "namespaces", "Node": "nodes", "IPPool": "pools"}


def _existing(cluster: Cluster, kind: str) -> list[str]:
    if kind in _TABLE:
        return sorted(getattr(cluster, _TABLE[kind]))
    return sorted(p.key for p in cluster.cluster_policies() if p.kind == kind)


@pytest.mark.parametrize("dual", [False, True], ids=["ipv4", "dual-stack"])
@pytest.mark.parametrize("seed", range(8))
def test_incremental_equals_full_after_every_event(seed, dual):
    """Both families: with dual, the IPv6 chains and cali60 sets are compared too (the
    states are compared whole)."""
    rng = random.Random(seed)
    cluster = Cluster()
    cfg = CalcConfig(ME)
    inc = IncrementalCalc(cfg)
    v6_members: set[str] = set()
    for step in range(250):
        cluster.apply(random_event(rng, cluster, dual))
        if rng.random() < 0.3:
            continue  # several events in one batch, as the agent's loop takes them
        full_errors: list[str] = []
        inc_errors: list[str] = []
        full = dataplane_state(cluster, cfg, full_errors)
        got = inc.state(cluster, inc_errors)
        assert got == full, f"seed {seed} step {step}"
        assert inc_errors == full_errors, f"seed {seed} step {step}"
        v6_members |= {m for n, st in full.ipsets.items() if n.startswith("cali60") for m in st.members}
    assert inc.rebuilds == 1  # it really went incrementally, not by rebuilding
    assert bool(v6_members) == dual  # the IPv6 sets really were filled (and only when asked)


def test_a_label_change_rebuilds_only_the_sets_it_moves_the_pod_between():
    cluster = Cluster()
    cfg = CalcConfig(ME)
    for r in (Pod("a", "local", (("app", "web"),), node=ME, ips=("10.0.0.1",)),
              WorkloadEndpoint("a", "local", ME, "c", iface_of("a", "local"), ("10.0.0.1",)),
              Pod("a", "db", (("app", "db"),), node="n1", ips=("10.0.0.2",)),
              Pod("a", "other", (("app", "cache"),), node="n1", ips=("10.0.0.3",)),
              NetworkPolicy("a", "web", LabelSelector((("app", "web"),)), ingress=(
                  PolicyRule(peers=(PolicyPeer(pod_selector=LabelSelector((("app", "db"),))),
                                    PolicyPeer(pod_selector=LabelSelector((("app", "cache"),))))),)),
              ):
        cluster.apply(Update(KIND_OF[type(r)], r.key, r))
    inc = IncrementalCalc(cfg)
    before = inc.state(cluster).ipsets
    cluster.apply(Update("Pod", "a/db", Pod("a", "db", (("app", "cache"),), node="n1", ips=("10.0.0.2",))))
    after = inc.state(cluster).ipsets
    assert after == dataplane_state(cluster, cfg).ipsets
    changed = {n for n in after if n.startswith("cali40s:") and before.get(n) is not after[n]}
    # the db set lost the pod, the cache set gained it; no other selector set was rebuilt
    assert len(changed) == 2
    assert {frozenset(after[n].members) for n in changed} == {frozenset(), frozenset({"10.0.0.2", "10.0.0.3"})}
