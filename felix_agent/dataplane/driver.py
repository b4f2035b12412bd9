"""The contract every dataplane driver keeps, so the barrier (barrier.py) can run them
all the same way: in a declared order, timed, skipped when their slice of the plan has
not changed since they last applied it cleanly, and reported uniformly.

A driver owns one family of kernel objects (or one process, BIRD).  In a pass the
barrier calls, for each driver in order:
    want = driver.wanted(plan)        # its slice of the Plan; compared with ==
    driver.set_desired(want)          # only when due: a full pass, or the slice changed
    result = driver.apply(full)       # reconcile; full=True reads the kernel back
and afterwards, in reverse order, `apply_removals(full)` for the drivers that ran: what
other objects may still reference (ipsets under iptables rules) is deleted only after
everything that referenced it has been rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol

from felix_agent.calc.plan import Plan


@dataclass
class ApplyResult:
    # what this apply changed, for the pass's log line (empty: nothing)
    changes: dict[str, object] = field(default_factory=dict)
    # part of it failed: apply again at the next pass even if the plan did not change
    failed: bool = False
    # conditions that degrade the node without failing the pass (a missing kernel
    # module, a refused sysctl): key -> why.  They stand until the driver's next apply;
    # the agent shows them as last_error (and /readyz, for "forwarding").
    problems: dict[str, str] = field(default_factory=dict)


class Driver(Protocol):
    name: str  # the metrics label (tortie_dataplane_apply_seconds{driver}) and the skip key

    def wanted(self, plan: Plan) -> Hashable | object:
        """This driver's part of the plan (any value comparable with ==)."""

    def set_desired(self, wanted) -> None:
        """Take `wanted` as the state to reconcile to at the next apply()."""

    def apply(self, full: bool) -> ApplyResult:
        """Make the kernel match; full=False may trust the driver's own view of it."""

    def apply_removals(self, full: bool) -> ApplyResult:
        """Second phase (reverse order): delete what others may have referenced."""


class SinglePhase:
    """A base for drivers with nothing to remove in the second phase."""

    def apply_removals(self, full: bool) -> ApplyResult:
        return ApplyResult()
