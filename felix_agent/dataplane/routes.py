"""The route driver: reconciles the main table's routes that carry our protocol number.

The protocol number is the ownership mark.  Routes with any other proto (BIRD's "proto
bird", the CNI's workload routes, "proto kernel" connected routes, an operator's "proto
static") are never replaced or deleted; a desired route whose destination is already
held by one of them is reported as a conflict and skipped.

apply() opens an rtnetlink socket (pyroute2 IPRoute, not NDB: NDB's start-up costs about
a second) for the duration of the call, dumps links and routes once, then sends only
the needed replace/delete requests.  One failing request (e.g. a device that does not
exist yet) is reported in `failed` and does not stop the others; the next apply retries.
The socket is private to the call and a lock serialises callers, so apply() may run on
any worker thread.
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from felix_agent.calc.desired import Route

log = logging.getLogger(__name__)

MAIN_TABLE = 254
RTNH_F_ONLINK = 4
SCOPES = {"universe": 0, "link": 253, "host": 254}
TYPES = {"unicast": 1, "blackhole": 6, "unreachable": 7, "prohibit": 8}
_SCOPE_NAMES = {v: k for k, v in SCOPES.items()}
_TYPE_NAMES = {v: k for k, v in TYPES.items()}
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")


def default_priority(version: int) -> int:
    """The metric the kernel gives a route added without one (IPv6 uses 1024)."""
    return 0 if version == 4 else 1024


def _same_family_address(r: Route, field: str, version: int) -> str:
    """Route field `field` ("gateway" or "src") as the kernel prints it, "" when unset;
    ValueError unless it is an address of the destination's family."""
    value = getattr(r, field)
    if not value:
        return ""
    try:
        a = ipaddress.ip_address(value)
    except ValueError as e:
        raise ValueError(f"route {r.dst}: bad {field}: {e}") from None
    if a.version != version:
        raise ValueError(f"route {r.dst}: {field} {value} is not IPv{version}")
    return str(a)


def normalize(r: Route) -> Route:
    """Validate a desired route and return it in the form a kernel dump reads back as.

    Raises ValueError with the reason for anything the kernel would refuse or misread.
    """
    if not isinstance(r, Route):
        raise ValueError(f"{r!r} is not a Route")
    try:
        dst = ipaddress.ip_network(r.dst, strict=True)
    except ValueError as e:
        raise ValueError(f"route {r.dst!r}: bad destination: {e}") from None
    if r.type not in TYPES:
        raise ValueError(f"route {r.dst}: type must be one of {', '.join(TYPES)}, not {r.type!r}")
    if r.scope not in SCOPES:
        raise ValueError(f"route {r.dst}: scope must be one of {', '.join(SCOPES)}, not {r.scope!r}")
    gw = _same_family_address(r, "gateway", dst.version)
    src = _same_family_address(r, "src", dst.version)
    if r.dev and not _IFNAME_RE.match(r.dev):
        raise ValueError(f"route {r.dst}: bad device name {r.dev!r}")
    if r.type != "unicast" and (r.dev or gw or r.onlink):
        raise ValueError(f"route {r.dst}: a {r.type} route takes no dev, gateway or onlink")
    if r.type == "unicast" and not (r.dev or gw):
        raise ValueError(f"route {r.dst}: a unicast route needs a dev or a gateway")
    if r.onlink and not (gw and r.dev):
        raise ValueError(f"route {r.dst}: onlink needs both a gateway and a dev")
    if gw and r.scope != "universe":
        raise ValueError(f"route {r.dst}: a route via a gateway must have scope universe")
    return Route(dst=str(dst), dev=r.dev, gateway=gw, onlink=r.onlink, scope=r.scope, type=r.type, src=src)


def matches(desired: Route, actual: Route) -> bool:
    """Equal, except that a desired route without a dev accepts the one the kernel chose."""
    if not desired.dev:
        actual = Route(**{**actual.__dict__, "dev": ""})
    return desired == actual


@dataclass(frozen=True)
class KernelRoute:
    """One main-table route from the dump, reduced to what we compare and own."""

    route: Route
    proto: int
    priority: int
    version: int
    type_num: int = 1
    scope_num: int = 0


def from_kernel(msg, ifnames: dict[int, str]) -> KernelRoute | None:
    """A route message as a KernelRoute; None for routes outside the main table."""
    table = msg.get("table")
    if table != MAIN_TABLE:
        return None
    version = 4 if msg["family"] == socket.AF_INET else 6
    dst = msg.get("dst") or ("0.0.0.0" if version == 4 else "::")
    oif = msg.get("oif")
    route = Route(
        dst=str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)),
        dev=ifnames.get(oif, f"if{oif}") if oif else "",
        gateway=msg.get("gateway") or "",
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        scope=_SCOPE_NAMES.get(msg["scope"], str(msg["scope"])),
        type=_TYPE_NAMES.get(msg["type"], str(msg["type"])),
        src=msg.get("prefsrc") or "",
    )
    return KernelRoute(route, msg["proto"], msg.get("priority") or 0, version, msg["type"], msg["scope"])


@dataclass
class RouteChanges:
    """What one apply() did.  Falsy when no request was sent."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)  # dst -> the foreign route holding it
    failed: dict[str, str] = field(default_factory=dict)  # dst -> kernel error

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.deleted)

    def __bool__(self) -> bool:
        return self.changed


@dataclass(frozen=True)
class RoutePlan:
    put: list[tuple[Route, str]]  # (route, "add" | "replace")
    delete: list[KernelRoute]
    conflicts: dict[str, str]


def plan(desired: frozenset[Route], actual: list[KernelRoute], proto: int) -> RoutePlan:
    """Pure diff: which desired routes to write, which of ours to delete, which collide."""
    ours: dict[str, list[KernelRoute]] = {}
    foreign: dict[str, KernelRoute] = {}
    for k in actual:
        if k.proto == proto:
            ours.setdefault(k.route.dst, []).append(k)
        elif k.priority == default_priority(k.version):
            foreign.setdefault(k.route.dst, k)
    put: list[tuple[Route, str]] = []
    delete: list[KernelRoute] = []
    conflicts: dict[str, str] = {}
    wanted = {r.dst: r for r in desired}
    for dst, r in sorted(wanted.items()):
        have = ours.get(dst, [])
        at_default = [k for k in have if k.priority == default_priority(k.version)]
        # Ours at some other metric (hand-made duplicates) go; ours at the default metric
        # is what `replace` rewrites in place.
        delete.extend(k for k in have if k not in at_default)
        if at_default:
            if not matches(r, at_default[0].route):
                put.append((r, "replace"))
        elif dst in foreign:
            f = foreign[dst]
            conflicts[dst] = f"{f.route} proto {f.proto}"
        else:
            put.append((r, "add"))
    for dst, have in sorted(ours.items()):
        if dst not in wanted:
            delete.extend(have)
    return RoutePlan(put, delete, conflicts)


class RouteDriver:
    """Reconciles the routes with protocol `proto` in the main table of one namespace."""

    def __init__(self, netns: str | None = None, proto: int = 80):
        if not 0 < proto < 256 or proto in (1, 2, 3, 4):  # redirect/kernel/boot/static
            raise ValueError(f"route protocol must be 5..255 and not a reserved one, not {proto}")
        self.netns = netns
        self.proto = proto
        self._lock = threading.Lock()
        self._desired: frozenset[Route] = frozenset()

    def set_desired(self, routes: frozenset[Route]) -> None:
        """Replace the desired routes.  Raises ValueError (keeping the old state) on a bad
        route or two routes for one destination."""
        normalized: dict[str, Route] = {}
        for r in routes:
            n = normalize(r)
            if n.dst in normalized and normalized[n.dst] != n:
                raise ValueError(f"two different routes for {n.dst}: {normalized[n.dst]} and {n}")
            normalized[n.dst] = n
        with self._lock:
            self._desired = frozenset(normalized.values())

    def _open(self) -> IPRoute:
        # flags=0: never create the namespace (pyroute2's default would, on a typo).
        return IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()

    def read(self, ipr: IPRoute) -> tuple[list[KernelRoute], dict[str, int]]:
        # Resolve only the devices our desired routes name: a node with a thousand pods has
        # a thousand cali links, and parsing all of them on every pass cost ~0.3-1 s.
        # Routes through other devices are shown as "if<index>" (only foreign ones are).
        ifindex: dict[str, int] = {}
        for dev in {r.dev for r in self._desired if r.dev}:
            found = ipr.link_lookup(ifname=dev)
            if found:
                ifindex[dev] = found[0]
        names = {i: n for n, i in ifindex.items()}
        actual = [k for msg in ipr.route("dump") if (k := from_kernel(msg, names)) is not None]
        return actual, ifindex

    def apply(self) -> RouteChanges:
        with self._lock:
            ch = RouteChanges()
            try:
                ipr = self._open()
            except OSError as e:
                raise RuntimeError(f"cannot open rtnetlink in netns {self.netns!r}: {e}") from e
            with ipr:
                actual, ifindex = self.read(ipr)
                p = plan(self._desired, actual, self.proto)
                ch.conflicts = p.conflicts
                for dst, why in p.conflicts.items():
                    log.warning("route %s not programmed: held by foreign route %s", dst, why)
                for k in p.delete:
                    try:
                        ipr.route("del", **self._del_args(k))
                        ch.deleted.append(k.route.dst)
                    except NetlinkError as e:
                        if e.code != 3:  # ESRCH: already gone
                            ch.failed[k.route.dst] = f"delete: {e}"
                for r, verb in p.put:
                    try:
                        ipr.route("replace", **self._put_args(r, ifindex))
                        (ch.added if verb == "add" else ch.replaced).append(r.dst)
                    except (NetlinkError, KeyError) as e:
                        ch.failed[r.dst] = str(e) if isinstance(e, NetlinkError) else f"no device {r.dev!r}"
            for dst, why in ch.failed.items():
                log.warning("route %s: %s", dst, why)
            return ch

    def _put_args(self, r: Route, ifindex: dict[str, int]) -> dict:
        args: dict = {"dst": r.dst, "table": MAIN_TABLE, "proto": self.proto,
                      "type": TYPES[r.type], "scope": SCOPES[r.scope]}
        if r.dev:
            args["oif"] = ifindex[r.dev]  # KeyError -> reported as a missing device
        if r.gateway:
            args["gateway"] = r.gateway
        if r.onlink:
            args["flags"] = RTNH_F_ONLINK
        if r.src:
            args["prefsrc"] = r.src
        return args

    def _del_args(self, k: KernelRoute) -> dict:
        # Scope and type as dumped: the kernel matches them on delete (pyroute2 would
        # otherwise send scope universe and miss a scope-link route).
        args: dict = {"dst": k.route.dst, "table": MAIN_TABLE, "proto": self.proto,
                      "type": k.type_num, "scope": k.scope_num}
        if k.priority:
            args["priority"] = k.priority
        return args
