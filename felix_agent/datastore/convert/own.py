"""tortie's own kinds (apiVersion tortie.io/v1: IPPool, BGPPeer, WorkloadEndpoint,
BlockAffinity) <-> records.
"""
from __future__ import annotations

import ipaddress

from felix_agent import model
from felix_agent.model import BGPPeer, BlockAffinity, IPPool, WorkloadEndpoint
from felix_agent.datastore.convert.common import MAX_AS, POOL_MODES, Ctx, MAC_RE, k8s_obj, shared

def _own_spec(ctx: Ctx, obj: dict, fields: tuple[str, ...]) -> tuple[str, dict, dict]:
    ctx.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec"))
    meta = ctx.mapping(obj.get("metadata"), "metadata")
    spec = ctx.mapping(obj.get("spec"), "spec", fields)
    return ctx.string(meta.get("name"), "metadata.name"), meta, spec


def ip_pool_from_k8s(ctx: Ctx, obj: dict) -> IPPool:
    name, _, spec = _own_spec(ctx, obj, ("cidr", "blockSize", "mode", "crossSubnet",
                                         "natOutgoing", "disabled"))
    if not name:
        raise ctx.fail("metadata.name", "is required")
    cidr = ctx.cidr(spec.get("cidr"), "spec.cidr")
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError:
        raise ctx.fail("spec.cidr", f"{cidr} has host bits set") from None
    bs = spec.get("blockSize")
    # Calico's defaults: /26 blocks of 64 addresses for IPv4, /122 (64 addresses) for IPv6
    block_size = (model.DEFAULT_BLOCK_SIZE if net.version == 4 else model.DEFAULT_BLOCK_SIZE_V6) if bs is None \
        else ctx.integer(bs, "spec.blockSize", 0, net.max_prefixlen)
    if block_size < net.prefixlen:
        raise ctx.fail("spec.blockSize", f"{block_size} is shorter than the pool prefix /{net.prefixlen}")
    mode = spec.get("mode") or "bgp"
    if mode not in POOL_MODES:
        raise ctx.fail("spec.mode", f"{mode!r} is not one of {', '.join(POOL_MODES)}")
    if mode == "ipip" and net.version == 6:
        # The kernel's ipip carries IPv4 in IPv4 (Calico has no IPv6 IPIP either).
        raise ctx.fail("spec.mode", "ipip carries IPv4 only; an IPv6 pool takes bgp, direct or vxlan")
    cross = ctx.boolean(spec.get("crossSubnet"), "spec.crossSubnet")
    if cross and mode not in ("vxlan", "ipip"):
        raise ctx.fail("spec.crossSubnet", f"only applies to mode vxlan or ipip, not {mode}")
    return IPPool(name=name, cidr=cidr, block_size=block_size, mode=mode, cross_subnet=cross,
                  nat_outgoing=ctx.boolean(spec.get("natOutgoing"), "spec.natOutgoing"),
                  disabled=ctx.boolean(spec.get("disabled"), "spec.disabled"))


def bgp_peer_from_k8s(ctx: Ctx, obj: dict) -> BGPPeer:
    name, _, spec = _own_spec(ctx, obj, ("peerIP", "asNumber", "node", "passwordFile", "password"))
    if not name:
        raise ctx.fail("metadata.name", "is required")
    if "password" in spec:
        # Calico's secretKeyRef would need the agent to read Secrets; tortie keeps its RBAC
        # read-only on pods/namespaces/nodes/policies and BGPPeers live in etcd.
        raise ctx.fail("spec.password", "is not supported: put the password in a file on the nodes (e.g. a "
                                        "Secret mounted into the tortie-node pod) and set spec.passwordFile")
    pw_file = ctx.string(spec.get("passwordFile"), "spec.passwordFile")
    if pw_file and not pw_file.startswith("/"):
        raise ctx.fail("spec.passwordFile", f"must be an absolute path on the node, not {pw_file!r}")
    if '"' in pw_file or "\n" in pw_file:
        raise ctx.fail("spec.passwordFile", "must not contain quotes or newlines")
    return BGPPeer(name=name, peer_ip=ctx.address(spec.get("peerIP"), "spec.peerIP"),
                   as_number=ctx.integer(spec.get("asNumber"), "spec.asNumber", 1, MAX_AS),
                   node=ctx.string(spec.get("node"), "spec.node"), password_file=pw_file)


def wep_name(node: str, namespace: str, pod: str) -> str:
    """metadata.name of a WorkloadEndpoint object."""
    return f"{node}.{namespace}.{pod}"


def workload_endpoint_from_k8s(ctx: Ctx, obj: dict) -> WorkloadEndpoint:
    name, meta, spec = _own_spec(ctx, obj, ("node", "namespace", "pod", "containerID", "iface",
                                            "ips", "mac"))
    node = ctx.string(spec.get("node"), "spec.node", required=True)
    ns = ctx.string(spec.get("namespace"), "spec.namespace", required=True)
    pod = ctx.string(spec.get("pod"), "spec.pod", required=True)
    # Node names may contain dots, so the name cannot be split; it must agree with spec.
    if name and name != wep_name(node, ns, pod):
        raise ctx.fail("metadata.name", f"{name!r} must be {wep_name(node, ns, pod)!r} "
                       "(<node>.<namespace>.<pod> from spec)")
    if meta.get("namespace") and meta["namespace"] != ns:
        raise ctx.fail("metadata.namespace", f"{meta['namespace']!r} differs from spec.namespace {ns!r}")
    mac = ctx.string(spec.get("mac"), "spec.mac")
    if mac and not MAC_RE.match(mac):
        raise ctx.fail("spec.mac", f"{mac!r} is not a MAC address")
    ips = tuple(ctx.address(ip, f"spec.ips[{i}]")
                for i, ip in enumerate(ctx.sequence(spec.get("ips"), "spec.ips")))
    return WorkloadEndpoint(namespace=shared(ns), pod=pod, node=shared(node),
                            container_id=ctx.string(spec.get("containerID"), "spec.containerID"),
                            iface=ctx.string(spec.get("iface"), "spec.iface"), ips=ips,
                            mac=mac.lower())


def block_name(cidr: str) -> str:
    """metadata.name of a BlockAffinity ("10.65.1.0/26" -> "10.65.1.0-26")."""
    return cidr.replace("/", "-")


def block_affinity_from_k8s(ctx: Ctx, obj: dict) -> BlockAffinity:
    name, _, spec = _own_spec(ctx, obj, ("cidr", "node", "pool"))
    cidr = ctx.cidr(spec.get("cidr"), "spec.cidr")
    try:
        ipaddress.ip_network(cidr)
    except ValueError:
        raise ctx.fail("spec.cidr", f"{cidr} has host bits set") from None
    if name and name != block_name(cidr):
        raise ctx.fail("metadata.name", f"{name!r} must be {block_name(cidr)!r} (the cidr, '/' as '-')")
    return BlockAffinity(cidr=cidr, node=ctx.string(spec.get("node"), "spec.node", required=True),
                         pool=ctx.string(spec.get("pool"), "spec.pool"))


def ip_pool_k8s(r: IPPool) -> dict:
    return k8s_obj("IPPool", r.name, {"cidr": r.cidr, "blockSize": r.block_size, "mode": r.mode,
                                   "crossSubnet": r.cross_subnet, "natOutgoing": r.nat_outgoing,
                                   "disabled": r.disabled})


def bgp_peer_k8s(r: BGPPeer) -> dict:
    spec = {"peerIP": r.peer_ip, "asNumber": r.as_number}
    if r.node:
        spec["node"] = r.node
    if r.password_file:
        spec["passwordFile"] = r.password_file
    return k8s_obj("BGPPeer", r.name, spec)


def workload_endpoint_k8s(r: WorkloadEndpoint) -> dict:
    return k8s_obj("WorkloadEndpoint", wep_name(r.node, r.namespace, r.pod),
                {"node": r.node, "namespace": r.namespace, "pod": r.pod,
                 "containerID": r.container_id, "iface": r.iface, "ips": list(r.ips),
                 "mac": r.mac})


def block_affinity_k8s(r: BlockAffinity) -> dict:
    return k8s_obj("BlockAffinity", block_name(r.cidr), {"cidr": r.cidr, "node": r.node, "pool": r.pool})
