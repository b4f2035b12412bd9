"""Namespace, Pod and Node <-> records: taken as the API server gives them, with only the
fields tortie reads checked.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from felix_agent import model
from felix_agent.model import NamedPort, Namespace, Node, Pod
from felix_agent.datastore.convert.common import (
    ANN_AS, ANN_IPIP_ADDR, ANN_IPV4, ANN_IPV6, ANN_RR_CLUSTER, ANN_VXLAN_ADDR, ANN_VXLAN_MAC,
    ANN_VXLAN_ADDR6, ANN_VXLAN_MAC6,
    LAST_APPLIED, MAX_AS, PROTOCOLS, Ctx, MAC_RE, meta_of, k8s_obj, shared,
)

def namespace_from_k8s(ctx: Ctx, obj: dict) -> Namespace:
    name, _, meta = meta_of(ctx, obj, namespaced=False)
    return Namespace(name=name, labels=ctx.labels(meta.get("labels"), "metadata.labels"))


def pod_from_k8s(ctx: Ctx, obj: dict) -> Pod:
    name, ns, meta = meta_of(ctx, obj, namespaced=True)
    spec = ctx.mapping(obj.get("spec"), "spec")
    status = ctx.mapping(obj.get("status"), "status")
    annotations = ctx.mapping(meta.get("annotations"), "metadata.annotations")
    annotations = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    ports = []
    for ci, c in enumerate(ctx.sequence(spec.get("containers"), "spec.containers")):
        c = ctx.mapping(c, f"spec.containers[{ci}]")
        for pi, p in enumerate(ctx.sequence(c.get("ports"), f"spec.containers[{ci}].ports")):
            path = f"spec.containers[{ci}].ports[{pi}]"
            p = ctx.mapping(p, path)
            if not p.get("name"):
                continue  # only named ports matter: policies refer to them by name
            proto = p.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise ctx.fail(f"{path}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
            ports.append(NamedPort(name=ctx.string(p["name"], f"{path}.name"),
                                   port=ctx.integer(p.get("containerPort"), f"{path}.containerPort",
                                                    1, 65535),
                                   protocol=proto))
    ips: list[str] = []
    pod_ips = ctx.sequence(status.get("podIPs"), "status.podIPs")
    if pod_ips:
        for i, entry in enumerate(pod_ips):
            entry = ctx.mapping(entry, f"status.podIPs[{i}]")
            ips.append(ctx.address(entry.get("ip"), f"status.podIPs[{i}].ip"))
    elif status.get("podIP"):
        ips.append(ctx.address(status["podIP"], "status.podIP"))
    # A finished pod's address may already belong to a new pod: it must not match policy.
    finished = status.get("phase") in ("Succeeded", "Failed")
    if finished:
        ips = []
    return Pod(
        namespace=ns, name=name,
        labels=ctx.labels(meta.get("labels"), "metadata.labels"),
        node=shared(ctx.string(spec.get("nodeName"), "spec.nodeName")),
        ips=tuple(ips), ports=shared(tuple(ports)),
        annotations=model.labels_of({str(k): str(v) for k, v in annotations.items()}),
        host_network=ctx.boolean(spec.get("hostNetwork"), "spec.hostNetwork"),
        uid=ctx.string(meta.get("uid"), "metadata.uid"),
        finished=finished,
    )


def node_from_k8s(ctx: Ctx, obj: dict) -> Node:
    name, _, meta = meta_of(ctx, obj, namespaced=False)
    ann = ctx.mapping(meta.get("annotations"), "metadata.annotations")
    labels = ctx.mapping(meta.get("labels"), "metadata.labels")
    spec = ctx.mapping(obj.get("spec"), "spec")
    status = ctx.mapping(obj.get("status"), "status")

    def a(key: str) -> str:
        return ctx.string(ann.get(key), f"metadata.annotations[{key}]")

    internal: dict[int, str] = {}
    for i, addr in enumerate(ctx.sequence(status.get("addresses"), "status.addresses")):
        addr = ctx.mapping(addr, f"status.addresses[{i}]")
        if addr.get("type") == "InternalIP":
            try:
                ip = ipaddress.ip_address(addr.get("address", ""))
            except ValueError:
                continue
            internal.setdefault(ip.version, f"{ip}/{ip.max_prefixlen}")
    ip = (ctx.interface(a(ANN_IPV4), f"metadata.annotations[{ANN_IPV4}]", 4) if a(ANN_IPV4)
          else internal.get(4, ""))
    ip6 = (ctx.interface(a(ANN_IPV6), f"metadata.annotations[{ANN_IPV6}]", 6) if a(ANN_IPV6)
           else internal.get(6, ""))
    as_number = (ctx.integer(a(ANN_AS), f"metadata.annotations[{ANN_AS}]", 1, MAX_AS, from_str=True)
                 if a(ANN_AS) else None)
    pod_cidrs = ctx.sequence(spec.get("podCIDRs"), "spec.podCIDRs")
    if not pod_cidrs and spec.get("podCIDR"):
        pod_cidrs = [spec["podCIDR"]]
    pod_cidrs = [ctx.cidr(c, f"spec.podCIDRs[{i}]") for i, c in enumerate(pod_cidrs)]
    vxlan_addr = a(ANN_VXLAN_ADDR)
    if vxlan_addr:
        vxlan_addr = ctx.address(vxlan_addr, f"metadata.annotations[{ANN_VXLAN_ADDR}]")
    vxlan_mac = a(ANN_VXLAN_MAC)
    if vxlan_mac and not MAC_RE.match(vxlan_mac):
        raise ctx.fail(f"metadata.annotations[{ANN_VXLAN_MAC}]", f"{vxlan_mac!r} is not a MAC address")
    vxlan_addr6 = a(ANN_VXLAN_ADDR6)
    if vxlan_addr6:
        vxlan_addr6 = ctx.address(vxlan_addr6, f"metadata.annotations[{ANN_VXLAN_ADDR6}]")
        if ":" not in vxlan_addr6:
            raise ctx.fail(f"metadata.annotations[{ANN_VXLAN_ADDR6}]", f"{vxlan_addr6!r} is not IPv6")
    vxlan_mac6 = a(ANN_VXLAN_MAC6)
    if vxlan_mac6 and not MAC_RE.match(vxlan_mac6):
        raise ctx.fail(f"metadata.annotations[{ANN_VXLAN_MAC6}]", f"{vxlan_mac6!r} is not a MAC address")
    ipip_addr = a(ANN_IPIP_ADDR)
    if ipip_addr:
        ipip_addr = ctx.address(ipip_addr, f"metadata.annotations[{ANN_IPIP_ADDR}]")
    rr = a(ANN_RR_CLUSTER) or ctx.string(labels.get(ANN_RR_CLUSTER), f"metadata.labels[{ANN_RR_CLUSTER}]")
    if rr:
        ctx.address(rr, f"metadata.annotations[{ANN_RR_CLUSTER}]")  # BIRD wants an IPv4-shaped id
    return Node(
        name=name, ip=ip, ip6=ip6, as_number=as_number, pod_cidrs=tuple(pod_cidrs),
        vxlan_tunnel_addr=vxlan_addr, vxlan_tunnel_mac=vxlan_mac.lower(),
        vxlan_tunnel_addr6=vxlan_addr6, vxlan_tunnel_mac6=vxlan_mac6.lower(),
        ipip_tunnel_addr=ipip_addr, labels=ctx.labels(labels, "metadata.labels"),
        route_reflector_cluster_id=rr, ip_from_status=bool(ip) and not a(ANN_IPV4),
    )


def namespace_k8s(r: Namespace) -> dict:
    return k8s_obj("Namespace", r.name, labels=dict(r.labels))


def pod_k8s(r: Pod) -> dict:
    spec: dict[str, Any] = {"containers": [{"name": "main", "ports": [
        {"name": p.name, "containerPort": p.port, "protocol": p.protocol} for p in r.ports]}]}
    if r.node:
        spec["nodeName"] = r.node
    if r.host_network:
        spec["hostNetwork"] = True
    o = k8s_obj("Pod", r.name, spec, r.namespace, uid=r.uid, labels=dict(r.labels),
             annotations=dict(r.annotations))
    o["status"] = ({"podIP": r.ips[0], "podIPs": [{"ip": ip} for ip in r.ips]} if r.ips else {})
    if r.finished:  # the model keeps only that the pod ended, not how
        o["status"]["phase"] = "Succeeded"
    return o


def node_k8s(r: Node) -> dict:
    ann = {ANN_IPV4: "" if r.ip_from_status else r.ip, ANN_IPV6: r.ip6,
           ANN_AS: str(r.as_number) if r.as_number is not None else "",
           ANN_VXLAN_ADDR: r.vxlan_tunnel_addr, ANN_VXLAN_MAC: r.vxlan_tunnel_mac,
           ANN_VXLAN_ADDR6: r.vxlan_tunnel_addr6, ANN_VXLAN_MAC6: r.vxlan_tunnel_mac6,
           ANN_IPIP_ADDR: r.ipip_tunnel_addr, ANN_RR_CLUSTER: r.route_reflector_cluster_id}
    spec = {}
    if r.pod_cidrs:
        spec = {"podCIDR": r.pod_cidrs[0], "podCIDRs": list(r.pod_cidrs)}
    o = k8s_obj("Node", r.name, spec, labels=dict(r.labels),
             annotations={k: v for k, v in ann.items() if v})
    if r.ip_from_status:
        o["status"] = {"addresses": [{"type": "InternalIP", "address": r.address}]}
    return o
