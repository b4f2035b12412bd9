"""How tortiectl shows records: tables (kubectl's columns, -o wide adds more), JSON or YAML."""
from __future__ import annotations

import json
from typing import Any, Callable

import yaml

from felix_agent import model
from felix_agent.datastore import keys
from felix_agent.datastore.convert import to_k8s


def table(rows: list[list[str]], header: list[str], sep: str = "  ") -> str:
    """Columns padded to their widest cell, trailing blanks stripped."""
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    return "\n".join(sep.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols)


def _labels(labels: model.Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "<none>"


def _selector(sel: model.LabelSelector) -> str:
    return "<all>" if sel.is_empty else sel.canonical()


def _rules(rules: tuple) -> str:
    return str(len(rules))


# kind -> (headers, row function, extra wide headers, wide row function)
Columns = tuple[list[str], Callable[[Any], list[str]], list[str], Callable[[Any], list[str]]]
COLUMNS: dict[str, Columns] = {
    "Pod": (["NAMESPACE", "NAME", "NODE", "IPS"],
            lambda r: [r.namespace, r.name, r.node or "<none>", ",".join(r.ips) or "<none>"],
            ["HOSTNET", "PORTS", "LABELS"],
            lambda r: [str(r.host_network).lower(),
                       ",".join(f"{p.name}:{p.port}/{p.protocol}" for p in r.ports) or "<none>",
                       _labels(r.labels)]),
    "Namespace": (["NAME", "LABELS"], lambda r: [r.name, _labels(r.labels)], [], lambda r: []),
    "Node": (["NAME", "IP", "AS", "POD-CIDRS"],
             lambda r: [r.name, r.ip or "<none>", str(r.as_number or "default"),
                        ",".join(r.pod_cidrs) or "<none>"],
             ["IP6", "VXLAN", "VXLAN6", "IPIP", "RR-CLUSTER", "LABELS"],
             lambda r: [r.ip6 or "<none>",
                        f"{r.vxlan_tunnel_addr}/{r.vxlan_tunnel_mac}" if r.vxlan_tunnel_addr else "<none>",
                        f"{r.vxlan_tunnel_addr6}/{r.vxlan_tunnel_mac6}" if r.vxlan_tunnel_addr6 else "<none>",
                        r.ipip_tunnel_addr or "<none>", r.route_reflector_cluster_id or "<none>",
                        _labels(r.labels)]),
    "NetworkPolicy": (["NAMESPACE", "NAME", "POD-SELECTOR", "TYPES"],
                      lambda r: [r.namespace, r.name, _selector(r.pod_selector), ",".join(r.policy_types)],
                      ["INGRESS-RULES", "EGRESS-RULES"],
                      lambda r: [_rules(r.ingress), _rules(r.egress)]),
    "IPPool": (["NAME", "CIDR", "BLOCK", "MODE", "NAT", "DISABLED"],
               lambda r: [r.name, r.cidr, f"/{r.block_size}", r.mode, str(r.nat_outgoing).lower(),
                          str(r.disabled).lower()],
               ["CROSS-SUBNET"], lambda r: [str(r.cross_subnet).lower()]),
    "BGPPeer": (["NAME", "PEER-IP", "AS", "NODE"],
                lambda r: [r.name, r.peer_ip, str(r.as_number), r.node or "<all>"], [], lambda r: []),
    "WorkloadEndpoint": (["NODE", "NAMESPACE", "POD", "IFACE", "IPS"],
                         lambda r: [r.node, r.namespace, r.pod, r.iface, ",".join(r.ips)],
                         ["MAC", "CONTAINER"], lambda r: [r.mac, r.container_id[:12]]),
    "BlockAffinity": (["CIDR", "NODE", "POOL"], lambda r: [r.cidr, r.node, r.pool or "<none>"],
                      [], lambda r: []),
}


def _subject(p: model.TierPeer) -> str:
    if p.namespaces is not None:
        return f"namespaces: {_selector(p.namespaces)}"
    assert p.pods is not None
    return f"pods: {_selector(p.pods.pods)} in namespaces: {_selector(p.pods.namespaces)}"


for _kind in model.CLUSTER_POLICY_KINDS:
    COLUMNS[_kind] = (["NAME", "TIER", "PRIORITY", "SUBJECT"],
                      lambda r: [r.name, r.tier, str(r.priority) if r.priority != model.BANP_PRIORITY else "-",
                                 _subject(r.subject)],
                      ["INGRESS-RULES", "EGRESS-RULES"], lambda r: [_rules(r.ingress), _rules(r.egress)])


def render_table(kind: str, records: list[model.Record], wide: bool = False) -> str:
    headers, row, wheaders, wrow = COLUMNS[kind]
    return table([row(r) + (wrow(r) if wide else []) for r in records], headers + (wheaders if wide else []),
                 sep="   ")


def render(kind: str, records: list[model.Record], output: str, single: bool) -> str:
    if output in ("json", "yaml"):
        objs = [to_k8s(r) for r in records]
        doc: Any = objs[0] if single else {"apiVersion": "v1", "kind": "List", "items": objs}
        if output == "json":
            return json.dumps(doc, indent=2)
        return yaml.safe_dump(doc, sort_keys=False).rstrip()
    if not records:
        return f"No {keys.PLURAL[kind]} found."
    return render_table(kind, records, wide=(output == "wide"))
