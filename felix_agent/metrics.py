"""Prometheus metrics of the agent, in one registry the HTTP server exposes at /metrics."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
CNI_REQUESTS = Histogram("tortie_cni_request_seconds", "Local API requests from the CNI binary",
                         ["command", "result"], registry=REGISTRY)
