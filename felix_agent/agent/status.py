"""StatusView: the document `tortiectl status`, `node status` and `ipam show` read (served
at /status; called from the HTTP thread), put together from the loop's Status, the
endpoint registry, the dataplane's BGP view, the syncer's undecodable records and IPAM."""
from __future__ import annotations

import gc

from felix_agent.agent.endpoints import EndpointRegistry
from felix_agent.agent.health import Health
from felix_agent.agent.state import Status


class StatusView:
    def __init__(self, status: Status, health: Health, dataplane, syncer, endpoints: EndpointRegistry):
        self.status = status
        self.health = health
        self.dataplane = dataplane
        self.syncer = syncer
        self.endpoints = endpoints
        self.node_ip = ""
        self.ipam = None  # the node's IPAM, once started
        self.flows = None  # the flow log (agent/flows.py) when the config turns it on

    def bad_records(self) -> dict[str, str]:
        """key -> why, for every datastore key the syncer could not decode."""
        return {k: why for k, (why, _) in list(getattr(self.syncer, "bad_records", {}).items())}

    def as_dict(self) -> dict:
        st = self.status
        bgp = self.dataplane.bgp_status()
        bad = self.bad_records()
        bad_text = ""
        if bad:
            key, why = sorted(bad.items())[0]
            bad_text = f"datastore: {len(bad)} record(s) could not be decoded, e.g. {key}: {why}"
        weps = self.endpoints.sorted()
        ipam = self.ipam.show({w.container_id for w in weps}) if self.ipam is not None else None
        return {
            "node": st.node, "node_ip": self.node_ip, "datastore": st.datastore,
            "in_sync": st.in_sync, "sync_reason": st.sync_reason, "ready": self.health.ready,
            "iptables_backend": self.dataplane.backend, "routing_modes": list(self.dataplane.modes),
            "last_apply": st.last_apply, "last_apply_seconds": round(st.last_apply_seconds, 4),
            "applies": st.applies,
            # objects heap.settle() moved out of the cyclic collector's walks (0 before the first sync)
            "heap_frozen": gc.get_freeze_count(),
            "last_error": "; ".join(e for e in (st.last_error, bad_text) if e),
            "bad_records": [{"key": k, "why": why} for k, why in sorted(bad.items())],
            # e.g. a network-policy-api CRD that is not installed (kubernetes datastore)
            "datastore_notes": [f"{k}: {why}" for k, why in sorted(dict(getattr(self.syncer, "notes", {})).items())],
            "endpoints": [{"namespace": w.namespace, "pod": w.pod, "iface": w.iface, "ips": list(w.ips),
                           "container_id": w.container_id} for w in weps],
            "bgp_peers": [p for p in bgp if p.get("proto") == "BGP"],
            "flow_logs": self.flows.status() if self.flows is not None else {"state": "off"},
            "ipam": None if ipam is None else {
                "blocks": [{"cidr": b.cidr, "pool": b.pool, "used": b.used, "capacity": b.capacity}
                           for b in ipam.blocks],
                "allocations": len(ipam.allocations), "leaks": len(ipam.leaks),
                "allocation_list": [{"ip": a.ip, "container_id": a.container_id, "namespace": a.namespace,
                                     "pod": a.pod, "leak": a in ipam.leaks} for a in ipam.allocations]},
        }
