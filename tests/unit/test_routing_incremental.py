"""The routing calc kept node by node (calc/node_routing.py) against the from-scratch one
(the whole-cluster functions of routes.py and bird_conf.py): after every event of seeded
random sequences, both give the same routes, VXLAN entries, tunnel addresses, BIRD config,
warnings and errors.  The events add, change and remove nodes (addresses on two subnets,
AS numbers, route reflectors, published VTEPs of both families, pod CIDRs, IPv6 addresses on
two IPv6 subnets: IPv4-only, dual-stack and IPv6-only nodes), move and remove block
affinities of both families, and change pools (IPv4 and IPv6, every mode, crossSubnet,
disabled) and BGP peers of both families."""
from __future__ import annotations

import dataclasses
import random

import pytest

from felix_agent.calc.cluster import Cluster
from felix_agent.calc.plan import PlanConfig, Planner, routing_plan
from felix_agent.model import KIND_OF, BGPPeer, BlockAffinity, IPPool, Node, Update

ME = "n0"
NODES = tuple(f"n{i}" for i in range(6))
BLOCKS = (tuple(f"10.{p}.{i}.0/26" for p in (0, 1) for i in range(6))
          + tuple(f"fd65:{p}::{i:x}00/122" for p in (0, 1) for i in range(6)))
POOL_CIDRS = {4: ("10.0.0.0/16", "10.1.0.0/16", "10.0.0.0/8"), 6: ("fd65::/48", "fd65:1::/48", "fd65::/32")}


def node(rng: random.Random) -> Node:
    name = rng.choice(NODES)
    roll = rng.random()
    ip = ("" if roll < 0.1 else "fd00::5/64" if roll < 0.13
          else f"192.168.{rng.randint(0, 1)}.{rng.randint(1, 4)}/24")
    # about half the nodes dual-stack (and IPv6-only where ip is empty)
    ip6 = f"fd00:{rng.randint(0, 1)}::{rng.randint(1, 4)}/{rng.choice((64, 64, 128))}" if rng.random() < 0.5 else ""
    vtep, vtep6 = rng.random() < 0.3, rng.random() < 0.3
    return Node(name, ip=ip, ip6=ip6, as_number=rng.choice((None, None, 65001)),
                pod_cidrs=tuple(rng.sample(BLOCKS, rng.randint(0, 2))) if rng.random() < 0.3 else (),
                vxlan_tunnel_addr=f"10.9.0.{rng.randint(1, 9)}" if vtep else "",
                vxlan_tunnel_mac=f"02:00:00:00:00:0{rng.randint(1, 9)}" if vtep else "",
                vxlan_tunnel_addr6=f"fd69::{rng.randint(1, 9)}" if vtep6 else "",
                vxlan_tunnel_mac6=f"02:00:00:00:06:0{rng.randint(1, 9)}" if vtep6 else "",
                route_reflector_cluster_id=rng.choice(("",) * 12 + ("244.0.0.1", "bad-id")),
                ip_from_status=rng.random() < 0.2)


def random_event(rng: random.Random, cluster: Cluster) -> Update:
    roll = rng.random()
    if roll < 0.45:
        rec = node(rng)
    elif roll < 0.8:
        rec = BlockAffinity(rng.choice(BLOCKS), rng.choice(NODES + ("gone",)), "pool")
    elif roll < 0.92:
        version = rng.choice((4, 6))
        rec = IPPool(f"pool{rng.randint(0, 3)}", rng.choice(POOL_CIDRS[version]),
                     mode=rng.choice(("bgp", "direct", "vxlan") + (("ipip",) if version == 4 else ())),
                     cross_subnet=rng.random() < 0.3, disabled=rng.random() < 0.1,
                     nat_outgoing=rng.random() < 0.3)
    else:
        peer_ip = (f"192.168.{rng.randint(0, 2)}.254" if rng.random() < 0.5
                   else f"fd00:{rng.randint(0, 2)}::fe")
        rec = BGPPeer(f"tor{rng.randint(0, 2)}", peer_ip, 65100, node=rng.choice(("", ME, "n1")))
    kind = KIND_OF[type(rec)]
    table = {"Node": cluster.nodes, "BlockAffinity": cluster.block_affinities, "IPPool": cluster.pools,
             "BGPPeer": cluster.bgp_peers}[kind]
    if table and rng.random() < 0.25:  # remove one (a node removed, an affinity released...)
        return Update(kind, rng.choice(sorted(table)), None)
    return Update(kind, rec.key, rec)


def comparable(plan) -> tuple:
    return (plan.state.routes, plan.vxlan, plan.vxlan6, plan.bird_conf, plan.ipip_addr, plan.bird_secrets,
            plan.modes, plan.families, plan.state.chains6, plan.state.hooks6, plan.errors, plan.warnings)


def routing_part(planner: Planner, cluster: Cluster):
    """The routing part of a pass (the plan adds the policy calc's IPv6 chains to its own)."""
    planner.plan(cluster)
    return planner._routing[2]


CONFIGS = [PlanConfig(ME, "eth0"),
           PlanConfig(ME, "eth0", node_ip="192.168.0.9/24", derive_vteps=True, bgp_password_file="/etc/pw",
                      secrets_dir="/run/bird"),
           PlanConfig(ME, "eth0", node_ip="192.168.1.9/24", node_ip6="fd00:1::9/64", derive_vteps=True)]


@pytest.mark.parametrize("seed", range(18))
def test_kept_routing_equals_from_scratch_after_every_event(seed):
    rng = random.Random(seed)
    cfg = CONFIGS[seed % len(CONFIGS)]
    cluster = Cluster()
    planner = Planner(cfg)
    passes = 0
    for step in range(300):
        cluster.apply(random_event(rng, cluster))
        if rng.random() < 0.3:
            continue  # several events in one batch, as the agent's loop takes them
        got = routing_part(planner, cluster)
        passes += 1
        assert comparable(got) == comparable(routing_plan(cluster, cfg)), f"seed {seed} step {step}"
    # It really went node by node: rebuilds only when my node, the pools or the reflectors changed.
    assert planner.node_routing.rebuilds < passes * 0.8


def test_a_node_add_redoes_only_that_node():
    cluster = Cluster()
    for i in range(50):
        cluster.apply(Update("Node", f"n{i}", Node(f"n{i}", ip=f"192.168.0.{i + 1}/24")))
        cluster.apply(Update("BlockAffinity", f"10.0.{i}.0/26", BlockAffinity(f"10.0.{i}.0/26", f"n{i}", "p")))
    cluster.apply(Update("IPPool", "p", IPPool("p", "10.0.0.0/16", mode="vxlan")))
    cfg = PlanConfig(ME, "eth0", derive_vteps=True)
    planner = Planner(cfg)
    planner.plan(cluster)
    parts = dict(planner.node_routing._parts)
    new = Node("n50", ip="192.168.0.51/24")
    cluster.apply(Update("Node", new.name, new))
    cluster.apply(Update("BlockAffinity", "10.0.50.0/26", BlockAffinity("10.0.50.0/26", "n50", "p")))
    plan = routing_part(planner, cluster)
    assert planner.node_routing.rebuilds == 1
    after = planner.node_routing._parts
    assert [k for k in after if after[k] is not parts.get(k)] == ["n50"]  # the others' parts are the same objects
    assert comparable(plan) == comparable(routing_plan(cluster, cfg))
    cluster.apply(Update("Node", "n50", None))
    plan = routing_part(planner, cluster)
    assert "n50" not in planner.node_routing._parts and planner.node_routing.rebuilds == 1
    assert not any(r.dst == "10.0.50.0/26" for r in plan.state.routes)
    assert comparable(plan) == comparable(routing_plan(cluster, cfg))


def test_a_moved_affinity_moves_its_route():
    cluster = Cluster()
    for n in (Node(ME, ip="192.168.0.1/24"), Node("n1", ip="192.168.0.2/24"), Node("n2", ip="192.168.0.3/24")):
        cluster.apply(Update("Node", n.name, n))
    cluster.apply(Update("IPPool", "p", IPPool("p", "10.0.0.0/16", mode="direct")))
    b = BlockAffinity("10.0.1.0/26", "n1", "p")
    cluster.apply(Update("BlockAffinity", b.key, b))
    planner = Planner(PlanConfig(ME, "eth0"))
    assert {r.gateway for r in planner.plan(cluster).state.routes} == {"192.168.0.2"}
    cluster.apply(Update("BlockAffinity", b.key, dataclasses.replace(b, node="n2")))
    assert {r.gateway for r in planner.plan(cluster).state.routes} == {"192.168.0.3"}
