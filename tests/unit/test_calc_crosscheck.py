"""The resync's cross-check: a full pass's plan carries a snapshot of the model, the full
calc runs on it, and where the incremental result differs the full one is programmed and
the incremental calc is rebuilt.  Nothing here touches the kernel (apply is not called)."""
from __future__ import annotations

import shutil

import pytest

from felix_agent.calc.desired import IpSet
from felix_agent.calc.filter import dataplane_state
from felix_agent.dataplane.barrier import Dataplane
from felix_agent.model import BlockAffinity, IPPool, NetworkPolicy, Node, PolicyPeer, PolicyRule
from tests.unit.test_calc_fixtures import ME, cluster_of, pod, sel, upd

pytestmark = pytest.mark.skipif(shutil.which("iptables-nft-save") is None, reason="needs iptables-nft")


def test_full_pass_cross_checks_and_repairs_the_incremental_result(tmp_path):
    c = cluster_of(*pod("a", "web", "10.0.0.1", labels={"app": "web"}),
                   *pod("a", "db", "10.0.0.2", node="n2", labels={"app": "db"}),
                   NetworkPolicy("a", "p", sel(app="web"), ingress=(
                       PolicyRule(peers=(PolicyPeer(pod_selector=sel(app="db")),)),)))
    dp = Dataplane(ME, "eth0", iptables_backend="nft", run_dir=str(tmp_path), bird=False)
    assert dp.calculate(c).check is None  # between resyncs: no snapshot, no second calc
    plan = dp.calculate(c, full=True)
    assert plan.check is not None
    name = next(n for n in plan.state.ipsets if n.startswith("cali40s:"))
    plan.state.ipsets[name] = IpSet(name, frozenset({"10.9.9.9"}))  # a wrong incremental result
    first = dp.planner.policy_calc
    dp._cross_check(plan)
    assert plan.check is None
    assert plan.state.ipsets == dataplane_state(c, dp.planner.calc_config).ipsets  # the full result wins
    assert plan.state.ipsets[name].members == frozenset({"10.0.0.2"})
    dp.calculate(c)
    assert dp.planner.policy_calc is not first  # rebuilt from the model


def test_snapshot_does_not_follow_later_events():
    c = cluster_of(*pod("a", "web", "10.0.0.1"))
    snap = c.snapshot()
    for u in cluster_of(*pod("a", "web", "10.0.0.7")).pods.values():
        c.apply(upd(u))
    assert [e.ips for e in snap.endpoints()] == [("10.0.0.1",)]
    assert [e.ips for e in c.endpoints()] == [("10.0.0.1",)]  # the WEP's address wins in the join
    assert snap.pods["a/web"].ips == ("10.0.0.1",) and c.pods["a/web"].ips == ("10.0.0.7",)


def test_dual_stack_cross_check_keeps_the_routing_nat6_and_repairs_ipv6_filter():
    """With an IPv6 natOutgoing pool the plan's ip6tables state holds the routing part's nat
    table too: an agreeing cross-check leaves it alone, and a wrong IPv6 filter chain is
    found by name and replaced, the nat table kept."""
    from felix_agent.calc.plan import PlanConfig, Planner, cross_check
    from felix_agent.model import IPPool

    c = cluster_of(IPPool("pool6", "fd65::/48", nat_outgoing=True, block_size=122),
                   *pod("a", "web", "10.0.0.1", labels={"app": "web"}, ip6="fd65::1"),
                   NetworkPolicy("a", "p", sel(app="web"), ingress=(PolicyRule(),)))
    planner = Planner(PlanConfig(node=ME, uplink="eth0", bird=False))
    plan = planner.plan(c, full=True)
    assert "nat" in plan.state.chains6 and "filter" in plan.state.chains6
    nat6 = plan.state.chains6["nat"]
    assert cross_check(plan, planner.calc_config) == []
    plan = planner.plan(c, full=True)
    chain = next(n for n in plan.state.chains6["filter"] if n.startswith("cali-pi-"))
    right = plan.state.chains6["filter"][chain]
    plan.state.chains6 = {**plan.state.chains6, "filter": {**plan.state.chains6["filter"], chain: ()}}
    assert cross_check(plan, planner.calc_config) == [f"ip6tables {chain}"]
    assert plan.state.chains6["filter"][chain] == right and plan.state.chains6["nat"] == nat6


def test_full_pass_cross_checks_the_routing_part_too(tmp_path):
    c = cluster_of(*pod("a", "web", "10.0.0.1"),
                   Node(ME, ip="192.168.0.1/24"), Node("n2", ip="192.168.0.2/24"),
                   IPPool("p", "10.1.0.0/16", mode="direct"), BlockAffinity("10.1.2.0/26", "n2", "p"))
    dp = Dataplane(ME, "eth0", iptables_backend="nft", run_dir=str(tmp_path), bird=False)
    plan = dp.calculate(c, full=True)
    right = plan.state.routes
    assert {r.dst for r in right} == {"10.1.2.0/26"}
    plan.state.routes = frozenset()  # a wrong incremental result
    first = dp.planner.node_routing
    dp._cross_check(plan)
    assert plan.state.routes == right  # the full result wins
    dp.calculate(c)
    assert dp.planner.node_routing is not first  # rebuilt from the model
