"""Prometheus metrics of the agent, in one registry the HTTP server exposes at /metrics.

Two kinds of gauge live here.  Counters and gauges of the pipeline (events, apply times,
ipsets, rules) are updated where the work happens.  Gauges that describe the node's
current state (endpoints, IPAM, BGP sessions) are refreshed at scrape time by
`refresh_from_status`, from the same document /status serves: set where things change,
they lagged (IPAM addresses were only counted when pools, blocks or nodes changed, so a
new pod did not show), and BGP sessions were only counted when someone asked /status.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from felix_agent.logs import kv

log = logging.getLogger("tortie.metrics")
REGISTRY = CollectorRegistry(auto_describe=True)

ENDPOINTS = Gauge("tortie_endpoints", "Workload endpoints on this node", registry=REGISTRY)
POLICIES = Gauge("tortie_policies", "NetworkPolicies known to the agent", registry=REGISTRY)
IPSET_MEMBERS = Gauge("tortie_ipset_members", "Members across all tortie ipsets", registry=REGISTRY)
IPSETS = Gauge("tortie_ipsets", "tortie ipsets programmed", registry=REGISTRY)
IPTABLES_RULES = Gauge("tortie_iptables_rules", "Rules in tortie chains", ["table"], registry=REGISTRY)
APPLY_SECONDS = Histogram(
    "tortie_dataplane_apply_seconds", "Time to reconcile one dataplane driver", ["driver"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY)
DATASTORE_EVENTS = Counter("tortie_datastore_events_total", "Model events from the datastore", ["kind"],
                           registry=REGISTRY)
IN_SYNC = Gauge("tortie_datastore_in_sync", "1 when the datastore is in sync", registry=REGISTRY)
BGP_SESSIONS_UP = Gauge("tortie_bgp_sessions_up", "BGP sessions Established", registry=REGISTRY)
IPAM_BLOCKS = Gauge("tortie_ipam_blocks", "IPAM blocks owned by this node", registry=REGISTRY)
IPAM_ADDRESSES = Gauge("tortie_ipam_addresses_in_use", "Pod addresses allocated on this node",
                       registry=REGISTRY)
ERRORS = Counter("tortie_errors_total", "Errors by kind", ["kind"], registry=REGISTRY)
BIRD_RESTARTS = Counter("tortie_bird_restarts_total", "Times the agent found BIRD dead and restarted it",
                        registry=REGISTRY)
TASK_RESTARTS = Counter("tortie_task_restarts_total", "Core tasks restarted after a failure", ["task"],
                        registry=REGISTRY)
CNI_REQUESTS = Histogram("tortie_cni_request_seconds", "Local API requests from the CNI binary",
                         ["command", "result"], registry=REGISTRY)
# Flow logs (agent/flows.py): counts of packets the NFLOG rules logged (rate limited, so
# a floor of what passed), per verdict and the policy that decided.
FLOW_PACKETS = Counter("tortie_flow_logged_packets_total", "Packets the flow-log rules logged",
                       ["verdict", "tier", "policy"], registry=REGISTRY)
FLOWS = Gauge("tortie_flows", "Flows in the agent's flow table", registry=REGISTRY)
FLOW_EVICTIONS = Counter("tortie_flow_evictions_total", "Flows evicted from the full flow table (least "
                         "recently seen first)", registry=REGISTRY)
FLOW_OVERRUNS = Counter("tortie_flow_log_overruns_total", "Times the kernel dropped flow-log messages "
                        "for a full socket buffer", registry=REGISTRY)

# Known error kinds are exported from the start (at 0), so a rate() or an alert on them
# works before the first error rather than seeing "no data".
ERROR_KINDS = ("dataplane", "datastore", "metrics", "datastore_decode")
for _kind in ERROR_KINDS:
    ERRORS.labels(kind=_kind)


@dataclass(frozen=True)
class NodeSnapshot:
    """The node-state gauges, read from one /status document."""

    endpoints: int
    ipam_blocks: int
    ipam_addresses: int
    bgp_sessions_up: int


def snapshot_from_status(doc: dict) -> NodeSnapshot:
    ipam = doc.get("ipam") or {}
    peers = doc.get("bgp_peers") or []
    return NodeSnapshot(
        endpoints=len(doc.get("endpoints") or []),
        ipam_blocks=len(ipam.get("blocks") or []),
        ipam_addresses=int(ipam.get("allocations") or 0),
        bgp_sessions_up=sum(1 for p in peers if "Established" in str(p.get("info", ""))),
    )


def refresh_from_status(status: Callable[[], dict]) -> NodeSnapshot | None:
    """Set the node-state gauges from `status()` (the agent's /status document).  A
    failure is counted and logged; the scrape still serves every other metric."""
    try:
        snap = snapshot_from_status(status())
    except Exception as e:  # noqa: BLE001 - a scrape must never fail because of one source
        ERRORS.labels(kind="metrics").inc()
        log.warning("could not refresh node metrics from the status", extra=kv(error=e))
        return None
    ENDPOINTS.set(snap.endpoints)
    IPAM_BLOCKS.set(snap.ipam_blocks)
    IPAM_ADDRESSES.set(snap.ipam_addresses)
    BGP_SESSIONS_UP.set(snap.bgp_sessions_up)
    return snap


Page = Callable[[str], tuple[int, str, bytes]]  # query string -> (HTTP status, content type, body)


def json_page(ok: bool, doc: dict) -> tuple[int, str, bytes]:
    """A JSON page: 200 (ok) or 503 (a probe's failure), and the document (which says why)."""
    return 200 if ok else 503, "application/json", (json.dumps(doc, default=str) + "\n").encode()


def serve_pages(host: str, port: int, pages: dict[str, Page]) -> ThreadingHTTPServer:
    """GET path?query -> pages[path](query) over HTTP from a daemon thread (the agent's and the
    fan-out's /metrics and probes): answered even while the event loop is stuck, which
    is what a liveness probe must see."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            path, _, query = self.path.partition("?")
            page = pages.get(path)
            code, ctype, body = page(query) if page is not None else (404, "text/plain", b"not found\n")
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http-pages", daemon=True).start()
    return server
