"""Pod plumbing: the veth pair, addresses, routes and host sysctls of one attachment.

One module, two callers: the CNI binary (no agent configured) and the node agent's
worker threads.  The host side is always the namespace of the calling thread (the node);
the pod side is reached through a netlink socket opened inside the pod's namespace.
A netlink socket keeps the namespace it was created in, so the thread only visits the
pod's namespace for the instant it takes to create that socket (nsutil.entered restores
it, per thread), and every later call is namespace-safe from any thread.

Layout, as Calico has it:
  pod:  <ifname> with <ip>/32 and <ip6>/128, 169.254.1.1 dev <ifname> scope link,
        default via 169.254.1.1 dev <ifname>, default via fe80::ecee:eeff:feee:eeee (v6)
  host: cali... with MAC ee:ee:ee:ee:ee:ee (so its v6 link-local is the pod's v6 gateway),
        proxy_arp=1 + proxy_delay=0 (it answers ARP for 169.254.1.1 at once), forwarding,
        route_localnet, proxy_ndp; `<ip> dev cali... scope link` for each pod address.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
import zlib
from contextlib import ExitStack

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import nsutil
from .layout import GATEWAY_V4, GATEWAY_V6, HOST_MAC
from .logsetup import get_logger
from .errors import DATAPLANE_FAILURE, INVALID_ENV, CNIError

log = get_logger("tortie.cni.plumbing")

RT_SCOPE_LINK = 253
RTPROT_BOOT = 3  # what `ip route add` uses: routes print exactly as an admin would type them
IFA_F_NODAD = 0x02

# Host-side sysctls (path under /proc/sys/net with {if} for the interface, value).
HOST_SYSCTLS_V4 = (
    ("ipv4/conf/{if}/proxy_arp", "1"),
    ("ipv4/neigh/{if}/proxy_delay", "0"),
    ("ipv4/conf/{if}/forwarding", "1"),
    ("ipv4/conf/{if}/route_localnet", "1"),
)
HOST_SYSCTLS_V6 = (
    ("ipv6/conf/{if}/accept_ra", "0"),
    ("ipv6/conf/{if}/forwarding", "1"),
    ("ipv6/conf/{if}/proxy_ndp", "1"),
    # The pod needs the host's link-local address as its gateway right away; waiting
    # for duplicate address detection would delay its first v6 packet by a second or more.
    ("ipv6/conf/{if}/accept_dad", "0"),
)

# Plumbing touches shared kernel state keyed by interface name; two calls for the same
# host interface at once (a retried ADD racing a DEL) are serialised.  Striped locks: a
# fixed set, so a long-running agent does not grow one lock per pod it ever saw.
_LOCKS = tuple(threading.Lock() for _ in range(64))


def _lock_for(host_ifname: str) -> threading.Lock:
    return _LOCKS[zlib.crc32(host_ifname.encode()) % len(_LOCKS)]


def _parse_ips(ips: list[str]) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    out = []
    for s in ips:
        try:
            ifc = ipaddress.ip_interface(s)
        except ValueError:
            raise CNIError(INVALID_ENV, f"{s!r} is not an address in CIDR form") from None
        full = 32 if ifc.version == 4 else 128
        if ifc.network.prefixlen != full:
            raise CNIError(INVALID_ENV, f"pod address {s} must be a /{full}")
        out.append(ifc)
    if not out:
        raise CNIError(INVALID_ENV, "no pod addresses given")
    return out


def _ipr_in(stack: ExitStack, nsfd: int) -> IPRoute:
    with nsutil.entered(nsfd):
        ipr = IPRoute()
    stack.callback(ipr.close)
    return ipr


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _write_sysctl(rel: str, value: str) -> None:
    # /proc/sys/net resolves against the calling thread's namespace: the node's.
    with open(f"/proc/sys/net/{rel}", "w") as f:
        f.write(value)


def _read_sysctl(rel: str) -> str | None:
    try:
        with open(f"/proc/sys/net/{rel}") as f:
            return f.read().strip()
    except OSError:
        return None


def _nl_msg(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        return os.strerror(e.code) if e.code > 0 else str(e)
    return str(e)


def setup(netns: str | int, ifname: str, host_ifname: str, ips: list[str], mtu: int = 1500,
          sandbox: str = "") -> dict:
    """Wire one pod attachment.  On any failure everything made here is removed again
    before the error is raised.  `sandbox` is the netns path for the result when netns
    is an fd (the agent gets an fd but knows the path from the request)."""
    addrs = _parse_ips(ips)
    if not 68 <= int(mtu) <= 65535:
        raise CNIError(INVALID_ENV, f"mtu {mtu} out of range")
    has_v6 = any(a.version == 6 for a in addrs)
    with _lock_for(host_ifname), ExitStack() as stack:
        nsfd = stack.enter_context(nsutil.opened(netns))
        if not sandbox:
            sandbox = nsutil.netns_path(netns) if isinstance(netns, str) else ""
        host = IPRoute()
        stack.callback(host.close)
        pod = _ipr_in(stack, nsfd)

        stale = _index(host, host_ifname)
        if stale is not None:
            # A sandbox of the same pod whose DEL never came (node crash): its veth holds
            # the name.  Calico removes it the same way.
            log.warning("removing stale host interface %s before ADD", host_ifname)
            host.link("del", index=stale)
        if _index(pod, ifname) is not None:
            raise CNIError(DATAPLANE_FAILURE, f"interface {ifname} already exists in {sandbox or 'the pod namespace'}")

        made = False
        try:
            try:
                host.link("add", ifname=host_ifname, kind="veth", address=HOST_MAC, mtu=mtu,
                          peer={"ifname": ifname, "net_ns_fd": nsfd, "mtu": mtu})
            except NetlinkError as e:
                raise CNIError(DATAPLANE_FAILURE,
                               f"cannot create veth {host_ifname}/{ifname}: {_nl_msg(e)}") from None
            made = True
            host_idx = _index(host, host_ifname)
            for rel, value in HOST_SYSCTLS_V4 + (HOST_SYSCTLS_V6 if has_v6 else ()):
                _write_sysctl(rel.format(**{"if": host_ifname}), value)
            host.link("set", index=host_idx, state="up")

            pod_idx = _index(pod, ifname)
            if pod_idx is None:
                raise CNIError(DATAPLANE_FAILURE, f"veth peer {ifname} did not appear in the pod namespace")
            if has_v6:
                with nsutil.entered(nsfd):
                    _write_sysctl(f"ipv6/conf/{ifname}/disable_ipv6", "0")
            pod.link("set", index=pod_idx, state="up")
            for a in addrs:
                kw = {"flags": IFA_F_NODAD} if a.version == 6 else {}
                pod.addr("add", index=pod_idx, address=str(a.ip), prefixlen=a.network.prefixlen, **kw)
            if any(a.version == 4 for a in addrs):
                pod.route("add", dst=f"{GATEWAY_V4}/32", oif=pod_idx, scope=RT_SCOPE_LINK, proto=RTPROT_BOOT)
                pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY_V4, oif=pod_idx, proto=RTPROT_BOOT)
            if has_v6:
                pod.route("add", dst="::/0", gateway=GATEWAY_V6, oif=pod_idx, family=socket.AF_INET6,
                          proto=RTPROT_BOOT)
            for a in addrs:
                # replace: an address reused after a leak may still have an old route.
                if a.version == 4:
                    host.route("replace", dst=f"{a.ip}/32", oif=host_idx, scope=RT_SCOPE_LINK, proto=RTPROT_BOOT)
                else:
                    host.route("replace", dst=f"{a.ip}/128", oif=host_idx, family=socket.AF_INET6,
                               proto=RTPROT_BOOT)
            pod_mac = pod.get_links(pod_idx)[0].get_attr("IFLA_ADDRESS")
            log.info("wired %s <-> %s in %s: %s", host_ifname, ifname, sandbox or "fd", ", ".join(ips))
            return {"host_mac": HOST_MAC, "container_mac": pod_mac, "host_ifname": host_ifname,
                    "sandbox": sandbox}
        except BaseException as e:
            if made:
                # Deleting the host end removes the pod end, its addresses and routes,
                # and the host routes through it.
                try:
                    idx = _index(host, host_ifname)
                    if idx is not None:
                        host.link("del", index=idx)
                except Exception:
                    log.exception("undo of %s failed", host_ifname)
            if isinstance(e, CNIError):
                raise
            if isinstance(e, (NetlinkError, OSError)):
                raise CNIError(DATAPLANE_FAILURE, f"wiring {host_ifname}/{ifname} failed: {_nl_msg(e)}") from None
            raise


def teardown(netns: str | int | None, ifname: str, host_ifname: str) -> None:
    """Remove an attachment's veth (and with it the host routes).  Idempotent: a missing
    veth or a vanished namespace is success."""
    with _lock_for(host_ifname), ExitStack() as stack:
        host = IPRoute()
        stack.callback(host.close)
        idx = _index(host, host_ifname)
        if idx is not None:
            try:
                host.link("del", index=idx)
                log.info("deleted host interface %s", host_ifname)
                # Deleting one end of a veth removes its peer too: nothing is left in the
                # pod, and opening its namespace again would only cost time on every DEL.
                return
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise CNIError(DATAPLANE_FAILURE, f"cannot delete {host_ifname}: {_nl_msg(e)}") from None
        if netns is None or (isinstance(netns, str) and not nsutil.namespace_exists(nsutil.netns_path(netns))):
            return
        try:
            nsfd = stack.enter_context(nsutil.opened(netns))
        except CNIError:
            return  # gone between the two looks
        pod = _ipr_in(stack, nsfd)
        pidx = _index(pod, ifname)
        if pidx is None:
            return
        # Only a veth is ours to remove; anything else under that name belongs to someone.
        link = pod.get_links(pidx)[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind == "veth":
            try:
                pod.link("del", index=pidx)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise CNIError(DATAPLANE_FAILURE, f"cannot delete {ifname} in the pod: {_nl_msg(e)}") from None


def _routes(ipr: IPRoute, family: int, oif: int) -> list[tuple[str, str, int]]:
    out = []
    for r in ipr.get_routes(family=family, table=254):
        if r.get_attr("RTA_OIF") != oif:
            continue
        dst = r.get_attr("RTA_DST")
        dst = f"{dst}/{r['dst_len']}" if dst else ("0.0.0.0/0" if family == socket.AF_INET else "::/0")
        out.append((dst, r.get_attr("RTA_GATEWAY") or "", r["scope"]))
    return out


def check(netns: str | int, ifname: str, host_ifname: str, ips: list[str]) -> None:
    """Verify an attachment is wired as setup() left it; raise CNIError naming the first
    thing that is missing or wrong."""
    addrs = _parse_ips(ips)

    def fail(what: str) -> None:
        raise CNIError(DATAPLANE_FAILURE, f"CHECK failed: {what}")

    with ExitStack() as stack:
        nsfd = stack.enter_context(nsutil.opened(netns))
        host = IPRoute()
        stack.callback(host.close)
        pod = _ipr_in(stack, nsfd)
        hidx = _index(host, host_ifname)
        if hidx is None:
            fail(f"host interface {host_ifname} does not exist")
        hlink = host.get_links(hidx)[0]
        if (hlink.get_attr("IFLA_ADDRESS") or "").lower() != HOST_MAC:
            fail(f"host interface {host_ifname} has MAC {hlink.get_attr('IFLA_ADDRESS')}, not {HOST_MAC}")
        if hlink.get_attr("IFLA_OPERSTATE") != "UP":
            fail(f"host interface {host_ifname} is {hlink.get_attr('IFLA_OPERSTATE')}, not UP")
        if _read_sysctl(f"ipv4/conf/{host_ifname}/proxy_arp") != "1":
            fail(f"proxy_arp is not 1 on {host_ifname}")
        pidx = _index(pod, ifname)
        if pidx is None:
            fail(f"interface {ifname} does not exist in the pod namespace")
        plink = pod.get_links(pidx)[0]
        if plink.get_attr("IFLA_LINK") != hidx:
            fail(f"{ifname} in the pod is not the peer of {host_ifname}")
        if plink.get_attr("IFLA_OPERSTATE") != "UP":
            fail(f"{ifname} in the pod is {plink.get_attr('IFLA_OPERSTATE')}, not UP")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in pod.get_addr(index=pidx)}
        for a in addrs:
            if (str(a.ip), a.network.prefixlen) not in have:
                fail(f"{ifname} in the pod lacks address {a}")
        host_v4 = _routes(host, socket.AF_INET, hidx)
        host_v6 = _routes(host, socket.AF_INET6, hidx)
        for a in addrs:
            dst = f"{a.ip}/{a.network.prefixlen}"
            if not any(d == dst for d, _gw, _s in (host_v4 if a.version == 4 else host_v6)):
                fail(f"host route {dst} dev {host_ifname} is missing")
        if any(a.version == 4 for a in addrs):
            pod_v4 = _routes(pod, socket.AF_INET, pidx)
            if (f"{GATEWAY_V4}/32", "", RT_SCOPE_LINK) not in pod_v4:
                fail(f"pod route {GATEWAY_V4} dev {ifname} scope link is missing")
            if not any(d == "0.0.0.0/0" and gw == GATEWAY_V4 for d, gw, _s in pod_v4):
                fail(f"pod default route via {GATEWAY_V4} dev {ifname} is missing")
        if any(a.version == 6 for a in addrs):
            pod_v6 = _routes(pod, socket.AF_INET6, pidx)
            if not any(d == "::/0" and gw == GATEWAY_V6 for d, gw, _s in pod_v6):
                fail(f"pod default route via {GATEWAY_V6} dev {ifname} is missing")
