"""Flow-log rules (calc/flowlog.py): they only add NFLOG rules before the verdicts, each
naming (through its prefix id) the policy and rule that decided, and are absent when off."""
from __future__ import annotations

import re

import pytest

from felix_agent.calc.desired import FlowRule
from felix_agent.calc.filter import CalcConfig
from felix_agent.calc.flowlog import PREFIX_MAX, FlowLogConfig
from felix_agent.calc.incremental import IncrementalCalc
from felix_agent.model import (
    ClusterNetworkPolicy,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    PolicyPeer,
    PolicyRule,
    TierPeer,
    TierRule,
)
from tests.unit.test_calc_fixtures import ME, cluster_of, iface_of, pod, sel, state

FL = FlowLogConfig(group=20)
X = TierPeer(namespaces=sel(**{"kubernetes.io/metadata.name": "x"}))
Y = TierPeer(namespaces=sel(**{"kubernetes.io/metadata.name": "y"}))
PREFIX_RE = re.compile(r"--nflog-prefix (\S+)")


def world(*records):
    return cluster_of(Namespace("x"), Namespace("y"),
                      pod("y", "c", "10.0.0.2", labels={"app": "c"}),
                      pod("x", "s", "10.0.0.3", labels={"app": "s"}), *records)


CNP = ClusterNetworkPolicy("no-y", "Admin", 5, X, ingress=(
    TierRule("Accept", (X,), name="same-ns"), TierRule("Deny", (Y,), name="block-y")))
NP = NetworkPolicy("x", "allow-x", LabelSelector(), ingress=(PolicyRule(peers=(
    PolicyPeer(namespace_selector=sel(**{"kubernetes.io/metadata.name": "x"})),)),))


def without_logs(chains: dict) -> dict:
    return {c: tuple(line for line in body if "-j NFLOG" not in line) for c, body in chains.items()}


def logged(chains: dict) -> dict[str, FlowRule]:
    """prefix -> the line after it (the verdict the log rule stands before)."""
    out = {}
    for body in chains.values():
        for i, line in enumerate(body):
            m = PREFIX_RE.search(line)
            if m:
                out[m.group(1)] = body[i + 1] if i + 1 < len(body) else ""
    return out


def test_off_by_default_and_on_only_adds_log_rules():
    c = world(CNP, NP)
    off, on = state(c), state(c, flow_logs=FL)
    assert not off.flow_rules
    assert not any("NFLOG" in line for body in off.chains["filter"].values() for line in body)
    assert without_logs(on.chains["filter"]) == off.chains["filter"]
    assert on.ipsets == off.ipsets and on.chains["nat"] == off.chains["nat"]


def test_each_verdict_has_a_log_rule_naming_its_policy_and_rule():
    s = state(world(CNP, NP), flow_logs=FL)
    prefixes = logged(s.chains["filter"])
    rules = {p: s.flow_rules[p.split(":", 1)[1]] for p in prefixes}
    got = {(r.verdict, r.tier, r.policy, r.rule, r.rule_name) for r in rules.values()}
    assert ("deny", "Admin", "ClusterNetworkPolicy/no-y", 1, "block-y") in got
    assert ("allow", "Admin", "ClusterNetworkPolicy/no-y", 0, "same-ns") in got
    assert ("allow", "NetworkPolicy", "NetworkPolicy x/allow-x", 0, "") in got
    # the NetworkPolicy tier's end: no NetworkPolicy of x/s allowed the packet
    assert ("deny", "NetworkPolicy", "NetworkPolicy x/allow-x", -1, "") in got
    for p, after in prefixes.items():
        assert len(p) < PREFIX_MAX
        assert p[0] == ("D" if rules[p].verdict == "deny" else "A")
        # a deny log rule stands right before the DROP it reports, with the same match
        if rules[p].verdict == "deny":
            assert after.endswith("-j DROP")
    tw = s.chains["filter"]["cali-tw-" + iface_of("x", "s")]
    assert tw[-2].startswith("-m hashlimit") and "-j NFLOG --nflog-group 20" in tw[-2] and tw[-1] == "-j DROP"


def test_a_falling_through_endpoint_chain_logs_the_default_allow_and_unselected_pods_log_nothing():
    s = state(world(ClusterNetworkPolicy("pass", "Admin", 5, X, ingress=(TierRule("Pass", (Y,)),))), flow_logs=FL)
    tw = s.chains["filter"]["cali-tw-" + iface_of("x", "s")]
    rule = s.flow_rules[PREFIX_RE.search(tw[-1]).group(1).split(":", 1)[1]]
    assert (rule.verdict, rule.tier) == ("allow", "default")
    assert s.chains["filter"]["cali-tw-" + iface_of("y", "c")] == ()


def test_the_incremental_calc_agrees_with_the_full_one():
    c = world(CNP, NP)
    inc = IncrementalCalc(CalcConfig(node_name=ME, flow_logs=FL)).state(c)
    full = state(c, flow_logs=FL)
    assert inc.chains == full.chains and inc.flow_rules == full.flow_rules


@pytest.mark.parametrize("bad", [dict(group=70000), dict(deny_rate=0), dict(allow_per_flow=10001)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        FlowLogConfig(**bad)


def test_both_families_log_every_verdict_with_the_same_ids_and_their_own_hashlimit_tables():
    c = cluster_of(Namespace("x"), Namespace("y"),
                   pod("y", "c", "10.0.0.2", labels={"app": "c"}, ip6="fd00::2"),
                   pod("x", "s", "10.0.0.3", labels={"app": "s"}, ip6="fd00::3"), CNP, NP)
    off, on = state(c), state(c, flow_logs=FL)
    v4, v6 = on.chains["filter"], on.chains6["filter"]
    # the IPv6 chains get only log rules added, as the IPv4 ones
    assert without_logs(v6) == off.chains6["filter"]
    p4, p6 = logged(v4), logged(v6)
    assert p6 and set(p6) == set(p4)  # one id per policy rule, whichever family logged it
    assert all(p.split(":", 1)[1] in on.flow_rules for p in p6)
    got6 = {(on.flow_rules[p.split(":", 1)[1]].verdict, on.flow_rules[p.split(":", 1)[1]].policy) for p in p6}
    assert ("deny", "ClusterNetworkPolicy/no-y") in got6 and ("deny", "NetworkPolicy x/allow-x") in got6
    tw6 = v6["cali-tw-" + iface_of("x", "s")]
    assert "-j NFLOG --nflog-group 20" in tw6[-2] and tw6[-1] == "-j DROP"
    names4 = {m for body in v4.values() for line in body for m in re.findall(r"--hashlimit-name (\S+)", line)}
    names6 = {m for body in v6.values() for line in body for m in re.findall(r"--hashlimit-name (\S+)", line)}
    assert names4 == {"cali-fl-d10", "cali-fl-a1"} and names6 == {"cali-fl6-d10", "cali-fl6-a1"}
    assert all(len(n) <= 15 for n in names6)  # the kernel's limit on a hashlimit name
    # the same rates in both families: the log rules differ only in the table's name
    limits = {fam: {re.sub(r"--hashlimit-name \S+ ", "", line) for body in chains.values() for line in body
                    if "-j NFLOG" in line and "-m set" not in line and "-s " not in line and "-d " not in line}
              for fam, chains in ((4, v4), (6, v6))}
    assert limits[4] and limits[4] == limits[6]
