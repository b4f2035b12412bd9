"""Pod plumbing: the veth pair, addresses, routes and host sysctls of one attachment.

One module, two callers: the CNI binary (no agent configured) and the node agent's
worker threads.  The host side is always the namespace of the calling thread (the node);
the pod side is reached through a netlink socket opened inside the pod's namespace.
A netlink socket keeps the namespace it was created in, so the thread only visits the
pod's namespace for the instant it takes to create that socket (nsutil.entered restores
it, per thread), and every later call is namespace-safe from any thread.

Everything here speaks rtnetlink through podnet.rtnl (stdlib, ~30 us a request), not
pyroute2: its sync API costs 0.2-0.4 ms a call and 110-140 ms to import, which the binary
would pay on every call without an agent.  The agent keeps pyroute2 for its route drivers.

Layout, as Calico has it:
  pod:  <ifname> with <ip>/32 and <ip6>/128, 169.254.1.1 dev <ifname> scope link,
        default via 169.254.1.1 dev <ifname>, default via fe80::ecee:eeff:feee:eeee (v6)
  host: cali... with MAC ee:ee:ee:ee:ee:ee (so its v6 link-local is the pod's v6 gateway),
        proxy_arp=1 + proxy_delay=0 (it answers ARP for 169.254.1.1 at once), forwarding,
        route_localnet=0, proxy_ndp; `<ip> dev cali... scope link` for each pod address.

Retiring (the agent's fast DEL): retire() takes the host veth down, renames it out of the
way and puts it in RETIRED_GROUP in one request; reap_retired() later deletes the whole
group in one request, which the kernel does in one unregister batch.
"""
from __future__ import annotations

import _socket
import _thread
import errno
import os

from podnet import nsutil
from podnet.layout import GATEWAY_V4, GATEWAY_V6, HOST_MAC
from podnet.logsetup import get_logger
from podnet.errors import DATAPLANE_FAILURE, INVALID_CONFIG, INVALID_ENV, CNIError
from podnet.result import IPInterface, parse_interface
from podnet.rtnl import RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, NetlinkError, Rtnl

log = get_logger("tortie.cni.plumbing")

# A retired host veth is renamed RETIRED_PREFIX + its ifindex in hex: at most 5 + 8 = 13
# characters (ifindex is a positive int32), unique in the namespace because the index is,
# and never a `cali` name, so neither setup() nor the agent's own scans mistake it for a pod.
RETIRED_PREFIX = "tortd"
# ... and moved to this link group, which reap_retired() deletes wholesale.  Groups are a
# namespace shared with admins (/etc/iproute2/group, usually small numbers) and a group
# delete takes every member, so the number must be one nobody picks by accident: "tort"
# in ASCII.
RETIRED_GROUP = 0x746F7274

# Host-side sysctls (path under /proc/sys/net with {if} for the interface, value).
HOST_SYSCTLS_V4 = (
    ("ipv4/conf/{if}/proxy_arp", "1"),
    ("ipv4/neigh/{if}/proxy_delay", "0"),
    ("ipv4/conf/{if}/forwarding", "1"),
    # Off, explicitly (a node whose conf/default has it on would pass it on): with it on,
    # a frame to 127.0.0.1 from the pod reaches the node's loopback services.  Nothing of
    # tortie's needs it; the portmap plugin sets it where its hostPort SNAT does.
    ("ipv4/conf/{if}/route_localnet", "0"),
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
# fixed set, so a long-running agent does not grow one lock per pod it ever saw.  (_thread
# locks are threading.Lock itself, without importing threading into the binary; hash() of
# a str varies between processes but not within one, which is all striping needs.)
_LOCKS = tuple(_thread.allocate_lock() for _ in range(64))


def _lock_for(host_ifname: str) -> "_thread.LockType":
    return _LOCKS[hash(host_ifname) % len(_LOCKS)]


class ExitStack:
    """The part of contextlib.ExitStack used here (enter_context, callback): clean-ups run
    last-in first-out when the block ends, every one even if one fails (the last failure
    propagates, the earlier one as its __context__).  contextlib itself costs the binary
    ~4 ms at every start: it imports collections and functools."""

    __slots__ = ("_undo",)

    def __init__(self) -> None:
        self._undo: list = []

    def __enter__(self) -> "ExitStack":
        return self

    def enter_context(self, cm):
        value = cm.__enter__()
        self._undo.append(lambda: cm.__exit__(None, None, None))
        return value

    def callback(self, fn) -> None:
        self._undo.append(fn)

    def __exit__(self, *exc) -> None:
        error: BaseException | None = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as e:  # the remaining clean-ups must still run
                if error is not None and e.__context__ is None:
                    e.__context__ = error
                error = e
        if error is not None:
            raise error


def _parse_ips(ips: list[str]) -> list[IPInterface]:
    # parse_interface reads what ipaddress.ip_interface reads, without its ~1.5 ms import.
    out = []
    for s in ips:
        try:
            ifc = parse_interface(s)
        except ValueError:
            raise CNIError(INVALID_ENV, f"{s!r} is not an address in CIDR form") from None
        full = 32 if ifc.version == 4 else 128
        if ifc.network.prefixlen != full:
            raise CNIError(INVALID_ENV, f"pod address {s} must be a /{full}")
        out.append(ifc)
    if not out:
        raise CNIError(INVALID_ENV, "no pod addresses given")
    return out


def _rtnl_in(stack: ExitStack, nsfd: int) -> Rtnl:
    with nsutil.entered(nsfd):
        nl = Rtnl()
    stack.callback(nl.close)
    return nl


def _host_rtnl(stack: ExitStack) -> Rtnl:
    nl = Rtnl()
    stack.callback(nl.close)
    return nl


def _both_sides(stack: ExitStack, netns: str | int) -> tuple[int, Rtnl, Rtnl]:
    """The pod's namespace opened, and a netlink socket on each side of the veth."""
    nsfd = stack.enter_context(nsutil.opened(netns))
    return nsfd, _host_rtnl(stack), _rtnl_in(stack, nsfd)


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
    """The kernel's refusal as text ("File exists"), as users have always seen it."""
    if isinstance(e, NetlinkError):
        return e.strerror or str(e)
    return str(e)


def _free_from_retired(host: Rtnl, pod: Rtnl, ifname: str) -> bool:
    """The pod's `ifname` may be the far end of a veth retired by a DEL of this same
    sandbox and not reaped yet (a runtime retrying ADD in the netns it just DELeted):
    then delete that veth now, as DEL did before retiring existed.  True if `ifname` is
    free afterwards.  Anything else under that name is not ours and stays."""
    link = pod.link(ifname)
    if link is None:
        return True
    if link.kind != "veth" or not link.peer_index:
        return False
    # IFLA_LINK is the peer's index in ITS namespace; whatever link has that index here
    # is only deleted when it is retired (garbage either way), and the name re-checked.
    peer = host.link(index=link.peer_index)
    if peer is None or peer.group != RETIRED_GROUP or not peer.name.startswith(RETIRED_PREFIX):
        return False
    try:
        host.del_link(peer.index)
    except NetlinkError as e:
        if e.errno != errno.ENODEV:
            raise
    return pod.link(ifname) is None


def occupant(netns: str | int, ifname: str) -> str | None:
    """Who holds `ifname` in the pod's namespace, asked before an ADD allocates or changes
    anything: None when nobody does (or only the far end of a retired veth, which setup()
    frees), else the name of the host-side veth it is wired to ("" when it is not a veth
    with a peer here: not ours at all).  The caller knows which container owns that name;
    an ADD must never replace another container's interface."""
    with ExitStack() as stack:
        _nsfd, host, pod = _both_sides(stack, netns)
        link = pod.link(ifname)
        if link is None:
            return None
        if link.kind != "veth" or not link.peer_index:
            return ""
        peer = host.link(index=link.peer_index)
        if peer is None:
            return ""
        if peer.group == RETIRED_GROUP and peer.name.startswith(RETIRED_PREFIX):
            return None
        return peer.name


def taken_error(ifname: str, sandbox: str, owner: str | None) -> CNIError:
    """The refusal of an ADD whose interface name another container already uses."""
    whose = f"container {owner}" if owner else "something that is not this container's"
    return CNIError(DATAPLANE_FAILURE, f"interface {ifname} already exists in {sandbox or 'the pod namespace'} "
                                       f"({whose}); nothing was changed",
                    "an ADD never replaces another container's interface: DEL that container first, "
                    "or use another CNI_IFNAME")


def setup(netns: str | int, ifname: str, host_ifname: str, ips: list[str], mtu: int = 1500,
          sandbox: str = "") -> dict:
    """Wire one pod attachment.  On any failure everything made here is removed again
    before the error is raised.  `sandbox` is the netns path for the result when netns
    is an fd (the agent gets an fd but knows the path from the request)."""
    addrs = _parse_ips(ips)
    if not 68 <= int(mtu) <= 65535:
        raise CNIError(INVALID_ENV, f"mtu {mtu} out of range")
    has_v6 = any(a.version == 6 for a in addrs)
    if has_v6 and int(mtu) < 1280:
        # The kernel turns IPv6 off on a link below 1280 bytes; say so before making anything
        # (else the v6 sysctls fail half-way with a bare "No such file" about /proc).
        raise CNIError(INVALID_CONFIG, f"mtu {mtu} is below 1280, the IPv6 minimum, and the pod has an "
                                       "IPv6 address", "raise mtu in the network config or use IPv4 only")
    with _lock_for(host_ifname), ExitStack() as stack:
        nsfd, host, pod = _both_sides(stack, netns)
        if not sandbox:
            sandbox = nsutil.netns_path(netns) if isinstance(netns, str) else ""

        stale = host.link(host_ifname)
        if stale is not None:
            # A sandbox of the same pod whose DEL never came (node crash): its veth holds
            # the name.  Calico removes it the same way.
            log.warning("removing stale host interface %s before ADD", host_ifname)
            host.del_link(stale.index)
        if pod.link(ifname) is not None and not _free_from_retired(host, pod, ifname):
            raise CNIError(DATAPLANE_FAILURE, f"interface {ifname} already exists in {sandbox or 'the pod namespace'}")

        made = False
        try:
            try:
                host.add_veth(host_ifname, ifname, nsfd, int(mtu), HOST_MAC)
            except NetlinkError as e:
                raise CNIError(DATAPLANE_FAILURE,
                               f"cannot create veth {host_ifname}/{ifname}: {_nl_msg(e)}") from None
            made = True
            host_link = host.link(host_ifname)
            if host_link is None:
                raise NetlinkError(errno.ENODEV, os.strerror(errno.ENODEV))
            host_idx = host_link.index
            for rel, value in HOST_SYSCTLS_V4 + (HOST_SYSCTLS_V6 if has_v6 else ()):
                _write_sysctl(rel.format(**{"if": host_ifname}), value)
            host.set_link(host_idx, up=True)

            # The lookup also gives the MAC the kernel chose for the pod end (for the result).
            pod_link = pod.link(ifname)
            if pod_link is None:
                raise CNIError(DATAPLANE_FAILURE, f"veth peer {ifname} did not appear in the pod namespace")
            pod_idx = pod_link.index
            if has_v6:
                with nsutil.entered(nsfd):
                    _write_sysctl(f"ipv6/conf/{ifname}/disable_ipv6", "0")
            pod.set_link(pod_idx, up=True)
            for a in addrs:
                pod.add_addr(pod_idx, str(a.ip), a.network.prefixlen, nodad=a.version == 6)
            if any(a.version == 4 for a in addrs):
                # The gateway's link route first: the kernel accepts `via 169.254.1.1` only
                # once that address is reachable on the link.
                pod.add_route(GATEWAY_V4, 32, pod_idx, scope=RT_SCOPE_LINK)
                pod.add_route("0.0.0.0", 0, pod_idx, gateway=GATEWAY_V4)
            if has_v6:
                pod.add_route("::", 0, pod_idx, gateway=GATEWAY_V6)
            for a in addrs:
                # replace: an address reused after a leak may still have an old route.
                scope = RT_SCOPE_LINK if a.version == 4 else RT_SCOPE_UNIVERSE
                host.add_route(str(a.ip), a.network.prefixlen, host_idx, scope=scope, replace=True)
            log.info("wired %s <-> %s in %s: %s", host_ifname, ifname, sandbox or "fd", ", ".join(ips))
            return {"host_mac": HOST_MAC, "container_mac": pod_link.mac, "host_ifname": host_ifname,
                    "sandbox": sandbox}
        except BaseException as e:
            if made:
                # Deleting the host end removes the pod end, its addresses and routes,
                # and the host routes through it.
                try:
                    left = host.link(host_ifname)
                    if left is not None:
                        host.del_link(left.index)
                except Exception:
                    log.exception("undo of %s failed", host_ifname)
            if isinstance(e, CNIError):
                raise
            if isinstance(e, OSError):
                raise CNIError(DATAPLANE_FAILURE, f"wiring {host_ifname}/{ifname} failed: {_nl_msg(e)}") from None
            raise


def teardown(netns: str | int | None, ifname: str, host_ifname: str) -> None:
    """Remove an attachment's veth (and with it the host routes).  Idempotent: a missing
    veth or a vanished namespace is success."""
    with _lock_for(host_ifname), ExitStack() as stack:
        host = _host_rtnl(stack)
        link = host.link(host_ifname)
        if link is not None:
            try:
                host.del_link(link.index)
                log.info("deleted host interface %s", host_ifname)
                # Deleting one end of a veth removes its peer too: nothing is left in the
                # pod, and opening its namespace again would only cost time on every DEL.
                return
            except NetlinkError as e:
                if e.errno != errno.ENODEV:
                    raise CNIError(DATAPLANE_FAILURE, f"cannot delete {host_ifname}: {_nl_msg(e)}") from None
        if netns is None or (isinstance(netns, str) and not nsutil.namespace_exists(nsutil.netns_path(netns))):
            return
        try:
            nsfd = stack.enter_context(nsutil.opened(netns))
        except CNIError:
            return  # gone between the two looks
        pod = _rtnl_in(stack, nsfd)
        plink = pod.link(ifname)
        # Only a veth is ours to remove; anything else under that name belongs to someone.
        if plink is not None and plink.kind == "veth":
            try:
                pod.del_link(plink.index)
            except NetlinkError as e:
                if e.errno != errno.ENODEV:
                    raise CNIError(DATAPLANE_FAILURE, f"cannot delete {ifname} in the pod: {_nl_msg(e)}") from None


def retire(host_ifname: str) -> bool:
    """Cut a pod off at once and free its host interface name, leaving the slow part
    (the kernel destroying the veth, 16-48 ms) to reap_retired().  In the calling thread's
    namespace: if a veth called `host_ifname` exists, ONE request takes it down (the pod's
    end loses carrier, the kernel drops the IPv4 routes through it), renames it to
    RETIRED_PREFIX + hex ifindex and moves it to RETIRED_GROUP; True.  False when there is
    no such veth (idempotent; a non-veth of that name is not ours and is left alone)."""
    with _lock_for(host_ifname), Rtnl() as host:
        link = host.link(host_ifname)
        if link is None or link.kind != "veth":
            return False
        new_name = f"{RETIRED_PREFIX}{link.index:x}"
        try:
            try:
                host.set_link(link.index, up=False, name=new_name, group=RETIRED_GROUP)
            except NetlinkError as e:
                if e.errno != errno.EBUSY:
                    raise
                # Kernels before 6.2 refuse to rename a device that is up, and apply the
                # name before the flags: take it down first, then rename.
                host.set_link(link.index, up=False)
                host.set_link(link.index, name=new_name, group=RETIRED_GROUP)
        except NetlinkError as e:
            if e.errno == errno.ENODEV:
                return False  # deleted under us: nothing left to retire
            raise CNIError(DATAPLANE_FAILURE, f"cannot retire {host_ifname}: {_nl_msg(e)}") from None
        log.info("retired host interface %s as %s", host_ifname, new_name)
        return True


def reap_retired() -> int:
    """Delete every retired link of the calling thread's namespace in one request (the
    kernel unregisters the whole group in one batch: 10 veths in ~50 ms, against 16-48 ms
    each one by one).  Returns how many there were; only RETIRED_GROUP is touched."""
    with Rtnl() as host:
        # Counted first: the delete itself does not say.  One retired between the count and
        # the delete goes too (it is retired), it is only missing from the count.
        count = sum(1 for link in host.links() if link.group == RETIRED_GROUP)
        if not count:
            return 0
        try:
            host.del_group(RETIRED_GROUP)
        except NetlinkError as e:
            if e.errno == errno.ENODEV:
                return 0  # another reaper was first
            raise CNIError(DATAPLANE_FAILURE, f"cannot delete retired interfaces: {_nl_msg(e)}") from None
        log.info("reaped %d retired host interfaces", count)
        return count


# --- CHECK -----------------------------------------------------------------------------

def _routes(rt: Rtnl, family: int, oif: int) -> list[tuple[str, str, int]]:
    return [(r.dst, r.gateway, r.scope) for r in rt.routes(family) if r.oif == oif]


def check(netns: str | int, ifname: str, host_ifname: str, ips: list[str]) -> None:
    """Verify an attachment is wired as setup() left it; raise CNIError naming the first
    thing that is missing or wrong."""
    addrs = _parse_ips(ips)

    def fail(what: str) -> None:
        raise CNIError(DATAPLANE_FAILURE, f"CHECK failed: {what}")

    with ExitStack() as stack:
        _nsfd, host, pod = _both_sides(stack, netns)
        hlink = host.link(host_ifname)
        if hlink is None:
            fail(f"host interface {host_ifname} does not exist")
        if hlink.mac.lower() != HOST_MAC:
            fail(f"host interface {host_ifname} has MAC {hlink.mac}, not {HOST_MAC}")
        if hlink.operstate != "UP":
            fail(f"host interface {host_ifname} is {hlink.operstate}, not UP")
        if _read_sysctl(f"ipv4/conf/{host_ifname}/proxy_arp") != "1":
            fail(f"proxy_arp is not 1 on {host_ifname}")
        plink = pod.link(ifname)
        if plink is None:
            fail(f"interface {ifname} does not exist in the pod namespace")
        if plink.peer_index != hlink.index:
            fail(f"{ifname} in the pod is not the peer of {host_ifname}")
        if plink.operstate != "UP":
            fail(f"{ifname} in the pod is {plink.operstate}, not UP")
        have = set(pod.addrs(plink.index))
        for a in addrs:
            if (str(a.ip), a.network.prefixlen) not in have:
                fail(f"{ifname} in the pod lacks address {a}")
        host_v4 = _routes(host, _socket.AF_INET, hlink.index)
        host_v6 = _routes(host, _socket.AF_INET6, hlink.index)
        for a in addrs:
            dst = f"{a.ip}/{a.network.prefixlen}"
            if not any(d == dst for d, _gw, _s in (host_v4 if a.version == 4 else host_v6)):
                fail(f"host route {dst} dev {host_ifname} is missing")
        if any(a.version == 4 for a in addrs):
            pod_v4 = _routes(pod, _socket.AF_INET, plink.index)
            if (f"{GATEWAY_V4}/32", "", RT_SCOPE_LINK) not in pod_v4:
                fail(f"pod route {GATEWAY_V4} dev {ifname} scope link is missing")
            if not any(d == "0.0.0.0/0" and gw == GATEWAY_V4 for d, gw, _s in pod_v4):
                fail(f"pod default route via {GATEWAY_V4} dev {ifname} is missing")
        if any(a.version == 6 for a in addrs):
            pod_v6 = _routes(pod, _socket.AF_INET6, plink.index)
            if not any(d == "::/0" and gw == GATEWAY_V6 for d, gw, _s in pod_v6):
                fail(f"pod default route via {GATEWAY_V6} dev {ifname} is missing")
