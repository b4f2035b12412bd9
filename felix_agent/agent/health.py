"""/livez, /readyz, /metrics and /status over HTTP, served from a daemon thread.

Liveness: the agent's loop has ticked recently.  Readiness: the datastore is in sync AND
the dataplane has been programmed since (the agent sets both flags) AND nothing holds the
node back (`holds`, asked at probe time: BIRD still in graceful restart recovery, so that a
rolling update moves on to the next node only once this one's routes have converged).
The JSON body of both says why when the answer is no.  /metrics first refreshes the node-state gauges
from the /status document (see metrics.refresh_from_status).
"""
from __future__ import annotations

import urllib.parse
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from felix_agent import metrics
from felix_agent.metrics import REGISTRY


@dataclass
class Health:
    in_sync: bool = False
    programmed: bool = False
    last_tick: float = field(default_factory=time.monotonic)
    liveness_timeout: float = 60.0
    reasons: dict[str, str] = field(default_factory=dict)
    # Returns {part: why} for every part stuck although it has work (the agent's
    # stalls()); called from the HTTP thread, so a stuck event loop is seen too.
    watchdog: Callable[[], dict[str, str]] | None = None
    # what keeps a programmed node from serving pods (the dataplane's "forwarding" problem)
    faults: dict[str, str] = field(default_factory=dict)
    # Returns {part: why} for every part not settled yet (wiring.py: BIRD's recovery)
    holds: Callable[[], dict[str, str]] | None = None

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def stalls(self) -> dict[str, str]:
        out = {}
        if time.monotonic() - self.last_tick >= self.liveness_timeout:
            out["loop"] = f"no tick for more than {self.liveness_timeout:.0f}s"
        if self.watchdog is not None:
            try:
                out.update(self.watchdog())
            except Exception as e:  # noqa: BLE001 - a probe must answer
                out["watchdog"] = f"{type(e).__name__}: {e}"
        return out

    @property
    def live(self) -> bool:
        return not self.stalls()

    def held(self) -> dict[str, str]:
        if self.holds is None:
            return {}
        try:
            return self.holds()
        except Exception as e:  # noqa: BLE001 - a probe must answer
            return {"holds": f"{type(e).__name__}: {e}"}

    def _ready(self, held: dict[str, str]) -> bool:
        return self.in_sync and self.programmed and not self.faults and not held

    @property
    def ready(self) -> bool:
        return self._ready(self.held())

    def report(self) -> dict:
        # An operator reading a failed probe (kubectl describe pod) should see why.
        held = self.held()
        reasons = {**held, **self.faults, **self.reasons}
        stalls = self.stalls()
        for part, why in stalls.items():
            reasons.setdefault(part, why)
        if not self.in_sync:
            reasons.setdefault("datastore", "not in sync yet")
        elif not self.programmed:
            reasons.setdefault("dataplane", "not programmed since the datastore synced")
        return {"live": not stalls, "ready": self._ready(held), "in_sync": self.in_sync,
                "programmed": self.programmed, "reasons": reasons}


def serve(health: Health, host: str, port: int, status=None, flows=None) -> ThreadingHTTPServer:
    """`status` is a callable returning a JSON-able dict, served at /status (tortiectl status);
    `flows` the flow log's document (agent/flows.py FlowLog.document), served at /flows
    with the query ?denied=1&namespace=NS&since=SEQ (tortiectl flows)."""
    def scrape(_query: str) -> tuple[int, str, bytes]:
        if status is not None:
            metrics.refresh_from_status(status)  # node-state gauges read now, not when last changed
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)

    pages: dict[str, metrics.Page] = {
        "/metrics": scrape,
        "/livez": lambda _q: metrics.json_page(health.live, health.report()),
        "/readyz": lambda _q: metrics.json_page(health.ready, health.report()),
        "/flows": lambda query: _flows_body(flows, query),
    }
    if status is not None:
        pages["/status"] = lambda _q: metrics.json_page(True, status())
    return metrics.serve_pages(host, port, pages)


def _flows_body(flows, query: str) -> tuple[int, str, bytes]:
    if flows is None:
        return metrics.json_page(True, {"flows": [], "seq": 0, "flow_logs": {
            "state": "off", "reason": "flow_logs is not set in the agent's config"}})
    q = urllib.parse.parse_qs(query)
    try:
        since = int(q.get("since", ["0"])[0])
    except ValueError:
        return 400, "text/plain", b"since: not a number\n"
    return metrics.json_page(True, flows(denied=q.get("denied", [""])[0] in ("1", "true"),
                                         namespace=q.get("namespace", [""])[0], since=since))
