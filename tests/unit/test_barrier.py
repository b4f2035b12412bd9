"""The apply barrier's contract with its drivers (felix_agent.dataplane.barrier.Barrier), with
drivers that record their calls instead of touching the kernel: the real drivers are covered
one by one in tests/integration/test_dataplane_*.py and together in test_dataplane_loop.py."""
import logging

from felix_agent.calc.desired import DesiredState
from felix_agent.calc.plan import Plan
from felix_agent.dataplane.barrier import Barrier
from felix_agent.dataplane.driver import ApplyResult


class Recording:
    """A driver whose slice is one key of plan.state.chains; it fails or reports what it is told."""

    def __init__(self, name: str, calls: list, fail_on: set | None = None, problems: dict | None = None):
        self.name, self.calls = name, calls
        self.fail_on = fail_on if fail_on is not None else set()
        self.problems = problems if problems is not None else {}

    def wanted(self, plan):
        return plan.state.chains.get(self.name)

    def set_desired(self, wanted):
        self.calls.append(("set", self.name, wanted))

    def apply(self, full):
        self.calls.append(("apply", self.name, full))
        return ApplyResult({self.name: "changed"}, failed="apply" in self.fail_on, problems=dict(self.problems))

    def apply_removals(self, full):
        self.calls.append(("remove", self.name, full))
        return ApplyResult(failed="remove" in self.fail_on)


def plan(**slices) -> Plan:
    return Plan(state=DesiredState(chains=slices))


def test_drivers_run_in_the_declared_order_and_removals_in_reverse():
    calls: list = []
    b = Barrier([Recording(n, calls) for n in ("sets", "rules", "routes")])
    summary = b.apply(plan(sets=1, rules=1, routes=1), full=True)
    assert [c[:2] for c in calls] == [
        ("set", "sets"), ("apply", "sets"), ("set", "rules"), ("apply", "rules"), ("set", "routes"),
        ("apply", "routes"), ("remove", "routes"), ("remove", "rules"), ("remove", "sets")]
    assert summary == {"sets": "changed", "rules": "changed", "routes": "changed"}


def test_between_resyncs_only_drivers_whose_slice_changed_run():
    calls: list = []
    b = Barrier([Recording(n, calls) for n in ("sets", "rules", "routes")])
    b.apply(plan(sets=1, rules=1, routes=1), full=True)
    calls.clear()
    assert b.apply(plan(sets=1, rules=2, routes=1), full=False) == {"rules": "changed"}
    assert calls == [("set", "rules", 2), ("apply", "rules", False), ("remove", "rules", False)]
    calls.clear()
    b.apply(plan(sets=1, rules=2, routes=1), full=True)  # a resync runs every driver again
    assert [c[1] for c in calls if c[0] == "apply"] == ["sets", "rules", "routes"]


def test_a_failed_driver_is_retried_by_the_next_pass_until_it_succeeds():
    calls: list = []
    routes = Recording("routes", calls, fail_on={"apply"})
    sets = Recording("sets", calls, fail_on={"remove"})
    b = Barrier([sets, routes])
    b.apply(plan(sets=1, routes=1), full=True)
    calls.clear()
    b.apply(plan(sets=1, routes=1), full=False)
    assert [c[:2] for c in calls if c[0] == "apply"] == [("apply", "sets"), ("apply", "routes")]
    routes.fail_on, sets.fail_on = set(), set()
    b.apply(plan(sets=1, routes=1), full=False)
    calls.clear()
    b.apply(plan(sets=1, routes=1), full=False)
    assert calls == []  # both applied cleanly: nothing left to do
    b.forget("routes")
    b.apply(plan(sets=1, routes=1), full=False)
    assert [c[:2] for c in calls if c[0] == "apply"] == [("apply", "routes")]


def test_problems_stand_until_the_driver_reports_otherwise_and_are_logged_once(caplog):
    calls: list = []
    tun = Recording("tunnel", calls, fail_on={"apply"}, problems={"ipip": "no ipip module"})
    b = Barrier([tun, Recording("routes", calls)])
    with caplog.at_level(logging.INFO, logger="tortie.dataplane"):
        b.apply(plan(tunnel=1, routes=1), full=True)
        b.apply(plan(tunnel=1, routes=1), full=False)  # retried (failed), same problem
        assert b.problems == {"ipip": "no ipip module"}
        tun.problems, tun.fail_on = {}, set()
        b.apply(plan(tunnel=1, routes=1), full=False)
    assert b.problems == {}
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("dataplane degraded") == 1 and msgs.count("dataplane problem cleared") == 1
