"""calc/trace.py: the verdict and the path to it (tier, policy, rule index, or the default),
read off the agent's own chains for a first packet."""
import pytest

from felix_agent.calc.trace import TraceError, trace
from felix_agent.model import (
    ClusterNetworkPolicy,
    LabelSelector,
    NamedPort,
    Namespace,
    NetworkPolicy,
    PolicyPeer,
    PolicyRule,
    TierPeer,
    TierPort,
    TierRule,
)
from tests.unit.test_calc_fixtures import cluster_of, pod, sel

X = TierPeer(namespaces=sel(**{"kubernetes.io/metadata.name": "x"}))
Y = TierPeer(namespaces=sel(**{"kubernetes.io/metadata.name": "y"}))


def world(*records, server_node="n1"):
    c = cluster_of(Namespace("x"), Namespace("y"), pod("y", "c", "10.0.0.2"),
                   pod("x", "s", "10.0.0.3", node=server_node, ports=(NamedPort("http", 80),)), *records)
    eps = {e.key: e for e in c.endpoints()}
    return c, eps["y/c"], eps["x/s"]


def test_no_policy_is_default_allow_and_self_is_allowed():
    c, cli, srv = world()
    t = trace(c, cli, srv, 80, "TCP")
    assert t.allowed and [d.decided_by for d in t.directions] == ["default", "default"]
    assert t.directions[1].reason == "no policy selects x/s for ingress: default allow"
    assert trace(c, srv, srv, 80, "tcp").allowed


@pytest.mark.parametrize("server_node", ["n1", "n2"])
def test_admin_deny_names_policy_and_rule(server_node):
    cnp = ClusterNetworkPolicy("guard", "Admin", 5, X, ingress=(
        TierRule("Accept", (X,), name="own"), TierRule("Deny", (Y,), (TierPort(None, name="http"),), name="no-y")))
    c, cli, srv = world(cnp, server_node=server_node)
    t = trace(c, cli, srv, 80, "tcp")
    assert not t.allowed
    ing = t.directions[1]
    assert (ing.decided_by, ing.node) == ("Admin", server_node)
    assert ing.steps[-1].policy == "ClusterNetworkPolicy/guard" and ing.steps[-1].rule == 1
    assert ing.steps[-1].rule_name == "no-y" and ing.steps[-1].action == "Deny"
    assert "ClusterNetworkPolicy/guard ingress rule 1: Deny" in t.reason
    assert trace(c, cli, srv, 81, "tcp").allowed  # the named port is 80 only


def test_pass_then_networkpolicy_then_baseline():
    deny_all = NetworkPolicy("x", "deny-all", LabelSelector())
    passing = ClusterNetworkPolicy("pass", "Admin", 1, X, ingress=(TierRule("Pass", (Y,)),))
    c, cli, srv = world(deny_all, passing)
    t = trace(c, cli, srv, 80, "tcp")
    ing = t.directions[1]
    assert not t.allowed and ing.decided_by == "NetworkPolicy"
    assert [s.action for s in ing.steps] == ["Pass"] and "NetworkPolicy x/deny-all" in ing.reason
    allow = NetworkPolicy("x", "allow-y", LabelSelector(), ingress=(PolicyRule(peers=(PolicyPeer(
        namespace_selector=sel(**{"kubernetes.io/metadata.name": "y"})),)),))
    c, cli, srv = world(allow, passing)
    ing = trace(c, cli, srv, 80, "tcp").directions[1]
    assert ing.allowed and ing.steps[-1].policy == "NetworkPolicy x/allow-y" and ing.steps[-1].action == "Allow"
    base = ClusterNetworkPolicy("base", "Baseline", 1, X, ingress=(TierRule("Deny", (Y,)),))
    c, cli, srv = world(base, passing)
    ing = trace(c, cli, srv, 80, "tcp").directions[1]
    assert not ing.allowed and ing.decided_by == "Baseline" and [s.action for s in ing.steps] == ["Pass", "Deny"]


def test_egress_to_an_address_and_bad_questions():
    cnp = ClusterNetworkPolicy("out", "Admin", 1, Y, egress=(TierRule("Deny", (TierPeer(networks=("192.0.2.0/24",)),)),))
    c, cli, _ = world(cnp)
    t = trace(c, cli, "192.0.2.7", 443, "tcp")
    assert not t.allowed and [d.direction for d in t.directions] == ["egress"]
    assert trace(c, cli, "198.51.100.1", 443, "tcp").allowed
    with pytest.raises(TraceError, match="protocol 'icmp'"):
        trace(c, cli, "192.0.2.7", 1, "icmp")
    with pytest.raises(TraceError, match="port 0"):
        trace(c, cli, "192.0.2.7", 0, "tcp")
