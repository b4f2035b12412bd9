"""Dataplane.apply with the real drivers in a lab node: between resyncs a pass touches only
drivers whose desired state changed (so hand-made drift survives it) and the iptables
tables plan against their own view (no iptables-save), and the full pass on the resync
timer reads and reconciles everything again."""
import pytest

from felix_agent.calc.desired import DesiredState, Hook, Route
from felix_agent.dataplane.barrier import Dataplane, Plan

pytestmark = pytest.mark.root


def plan(rule: str) -> Plan:
    chains = {"filter": {"cali-FORWARD": (rule,)}, "nat": {"cali-PREROUTING": ()}}
    hooks = (Hook("filter", "FORWARD", "cali-FORWARD"), Hook("nat", "PREROUTING", "cali-PREROUTING"))
    return Plan(state=DesiredState(chains=chains, hooks=hooks,
                                   routes=frozenset({Route(dst="10.77.0.0/26", type="blackhole")})))


def test_incremental_passes_skip_unchanged_drivers_full_passes_repair(make_lab, tmp_path):
    lab = make_lab(1)
    ns = lab.nodes[0].ns
    dp = Dataplane("node1", "eth0", netns=ns, run_dir=str(tmp_path), bird=False)
    dp.apply(plan("-j ACCEPT"), full=True)
    assert "blackhole 10.77.0.0/26" in lab.exec(ns, "ip", "route").stdout
    lab.exec(ns, "ip", "route", "del", "10.77.0.0/26")  # drift made by hand
    reads = dp.tables["filter"].reads
    summary = dp.apply(plan("-j DROP"), full=False)  # only the filter table changed
    assert set(summary) == {"iptables_filter"}
    assert dp.tables["filter"].reads == reads  # planned from the table's view: no iptables-save
    assert "-A cali-FORWARD" in lab.exec(ns, "iptables-save", "-t", "filter").stdout
    assert "DROP" in lab.exec(ns, "iptables-save", "-t", "filter").stdout
    assert "10.77.0.0/26" not in lab.exec(ns, "ip", "route").stdout  # routes were not read
    summary = dp.apply(plan("-j DROP"), full=True)
    assert "routes" in summary and "iptables_filter" not in summary
    assert dp.tables["filter"].reads == reads + 1  # the resync reads
    assert "blackhole 10.77.0.0/26" in lab.exec(ns, "ip", "route").stdout
