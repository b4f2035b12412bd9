"""/readyz waits while BIRD is in graceful restart recovery: a rolling update of the
DaemonSet then moves on to the next node only once this node's routes have converged
(otherwise two BIRDs in recovery at once stop waiting for each other and prune routes)."""
from felix_agent.agent.health import Health
from felix_agent.agent.wiring import Agent
from felix_agent.config import AgentConfig


class RecoveringBird:
    """Stands in for BirdDaemon.recovering (real BIRD: tests/integration/test_bgp_bird.py)."""

    def __init__(self):
        self.recovery = True

    def recovering(self) -> bool:
        return self.recovery


class Dataplane:
    def __init__(self):
        self.bird = RecoveringBird()


def test_bird_in_recovery_holds_readiness_and_says_why():
    dp = Dataplane()
    h = Agent(AgentConfig(node_name="n1"), dataplane=dp, syncer=None).health
    h.in_sync = h.programmed = True
    rep = h.report()
    assert not h.ready and not rep["ready"] and "graceful restart" in rep["reasons"]["bgp"]
    dp.bird.recovery = False
    assert h.ready and h.report()["ready"] and "bgp" not in h.report()["reasons"]


def test_a_failing_hold_check_keeps_the_node_unready():
    def broken() -> dict[str, str]:
        raise OSError("birdc vanished")
    h = Health(in_sync=True, programmed=True, holds=broken)
    assert not h.ready and "birdc vanished" in h.report()["reasons"]["holds"]


def test_no_dataplane_bird_no_hold():
    h = Agent(AgentConfig(node_name="n1"), dataplane=None, syncer=None).health
    h.in_sync = h.programmed = True
    assert h.ready
