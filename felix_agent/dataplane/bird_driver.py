"""BIRD as a driver: the plan's config text and password includes -> a running BIRD.

Between resyncs BIRD is left alone while its config stands (checking that it runs reads
three files); a full pass restarts it if it died, and re-reads the password files, so a
rotated password lands within a resync (a changed include makes BIRD re-read its
config).  When no pool wants BGP any more (a switch to vxlan or direct), a BIRD left
running would keep announcing blocks and installing routes beside the new ones: it is
stopped.
"""
from __future__ import annotations

import logging
import os

from felix_agent import metrics
from felix_agent.calc.plan import Plan
from felix_agent.dataplane.bird import BirdDaemon
from felix_agent.dataplane.bird_secrets import md5_counters, write_includes
from felix_agent.dataplane.driver import ApplyResult, SinglePhase

log = logging.getLogger("tortie.dataplane")


class BirdDriver(SinglePhase):
    name = "bird"

    def __init__(self, daemon: BirdDaemon, netns: str | None):
        self.daemon = daemon
        self.netns = netns
        self.secrets_dir = os.path.join(daemon.run_dir, "secrets")
        self._want: tuple[str | None, dict[str, str], bool] = (None, {}, False)
        self._seen = False  # BIRD ran (or was started) under this process
        self._passworded: set[str] = set()  # BGP protocols with a password, for status hints

    def wanted(self, plan: Plan):
        return plan.bird_conf, plan.bird_secrets, plan.wants_bird

    def set_desired(self, wanted) -> None:
        self._want = wanted

    def apply(self, full: bool) -> ApplyResult:
        conf, secrets, wants_bird = self._want
        if conf is None:
            # No config while a pool still wants BGP (this node has no address yet, or
            # the config was refused): keep what runs rather than withdraw every route.
            if not wants_bird and self.daemon.running():
                self.daemon.stop()
                return ApplyResult({"bird": "stopped (no bgp or ipip pool)"})
            return ApplyResult()
        res = ApplyResult()
        changed, secret_problems = write_includes(secrets, self.secrets_dir)
        self._passworded = {os.path.basename(p)[:-len(".conf")] for p in secrets}
        if secret_problems:
            res.problems["bgp_password"] = "BGP password: " + "; ".join(secret_problems.values())
        outcome = self.daemon.ensure(conf, reload=changed)
        if outcome != "unchanged":
            res.changes["bird"] = outcome
        if outcome == "started" and self._seen:
            metrics.BIRD_RESTARTS.inc()
            log.warning("bird was not running; restarted it")
        self._seen = True
        return res

    def died(self) -> bool:
        """True when BIRD should run under this agent and its process is gone."""
        return self._want[0] is not None and self._seen and not self.daemon.running()

    def recovering(self) -> bool:
        """BIRD restarted (-R) and still waits for its peers' routes (BirdDaemon.recovering)."""
        return self.daemon.recovering()

    def status(self) -> list[dict]:
        if not self.daemon.running():
            return []
        try:
            rows = self.daemon.protocols()
        except Exception as e:  # birdc unreachable mid-restart: report, do not fail status
            return [{"name": "bird", "state": "unknown", "info": str(e)}]
        down = [r for r in rows if r["name"] in self._passworded and not r["info"].startswith("Established")]
        if down:
            # With TCP MD5 the kernel drops the peer's segments that fail the check before
            # BIRD sees them, so BIRD can only say it gets no answer: the counters say why.
            c = md5_counters() if self.netns is None else {}
            why = (f"TCP MD5 password set; kernel: {c.get('TCPMD5Failure', 0)} segments with a wrong "
                   f"signature (the peer's password differs), {c.get('TCPMD5NotFound', 0)} without one "
                   "(the peer has no password)")
            for r in down:
                r["info"] = f"{r['info']} ({why})".strip()
        return rows
