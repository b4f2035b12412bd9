"""CNI results as typed records, read from and written to every supported version.

Internally a result is always the 1.1.0 shape.  `Result.from_dict` accepts any of
0.3.0-1.1.0 (0.3.x/0.4.0 ips carry "version", which is dropped); `to_dict(version)`
writes the shape the config asked for: 0.3.x/0.4.0 get "version" back on each ip, and
everything older than 1.1.0 loses the fields 1.1.0 added (interface mtu/socketPath/
pciID, route mtu/advmss/priority/table/scope), as libcni's converters do.
"""
from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton

from podnet import versions
from podnet.records import Record

TYPE_CHECKING = False  # typing's own constant, without importing typing (~2 ms)
if TYPE_CHECKING:
    import ipaddress


class ResultError(ValueError):
    """A result (prevResult, an IPAM plugin's or the agent's answer) has the wrong shape."""


class Interface(Record):
    __slots__ = ("name", "mac", "sandbox", "mtu", "socket_path", "pci_id")

    def __init__(self, name: str, mac: str = "", sandbox: str = "", mtu: int | None = None,
                 socket_path: str = "", pci_id: str = "") -> None:
        self.name = name
        self.mac = mac
        self.sandbox = sandbox
        self.mtu = mtu  # 1.1.0
        self.socket_path = socket_path  # 1.1.0
        self.pci_id = pci_id  # 1.1.0


class IPConfig(Record):
    __slots__ = ("address", "gateway", "interface")

    def __init__(self, address: str, gateway: str = "", interface: int | None = None) -> None:
        self.address = address  # CIDR, e.g. "10.0.0.5/32"
        self.gateway = gateway
        self.interface = interface

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        import ipaddress  # off the agent path: only the binary's own plumbing needs objects
        return ipaddress.ip_interface(self.address).ip

    @property
    def family(self) -> str:
        return "6" if ":" in self.address else "4"  # addresses are validated on the way in


ROUTE_11_FIELDS = ("mtu", "advmss", "priority", "table", "scope")


class Route(Record):
    __slots__ = ("dst", "gw", "extra")

    def __init__(self, dst: str, gw: str = "", extra: dict[str, int] | None = None) -> None:
        self.dst = dst
        self.gw = gw
        self.extra = {} if extra is None else extra  # the 1.1.0 route attributes


class DNS(Record):
    __slots__ = ("nameservers", "domain", "search", "options")

    def __init__(self, nameservers: list[str] | None = None, domain: str = "",
                 search: list[str] | None = None, options: list[str] | None = None) -> None:
        self.nameservers = [] if nameservers is None else nameservers
        self.domain = domain
        self.search = [] if search is None else search
        self.options = [] if options is None else options

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)

    @classmethod
    def from_dict(cls, d: object, where: str = "dns") -> "DNS":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ResultError(f"{where} must be an object")
        out = cls()
        for key in ("nameservers", "search", "options"):
            v = d.get(key)
            if v is None:
                continue
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ResultError(f"{where}.{key} must be a list of strings")
            setattr(out, key, list(v))
        dom = d.get("domain")
        if dom is not None:
            if not isinstance(dom, str):
                raise ResultError(f"{where}.domain must be a string")
            out.domain = dom
        return out

    def to_dict(self) -> dict:
        out: dict = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out


def _str(d: dict, key: str, where: str, required: bool = False) -> str:
    v = d.get(key)
    if v is None:
        if required:
            raise ResultError(f"{where}.{key} is required")
        return ""
    if not isinstance(v, str):
        raise ResultError(f"{where}.{key} must be a string")
    return v


def _int(d: dict, key: str, where: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ResultError(f"{where}.{key} must be an integer")
    return v


# Addresses are checked with inet_pton rather than the ipaddress module, whose import is
# ~1.5 ms of every start of the binary; the accepted forms are the same (ipaddress also
# takes a v6 scope "%eth0" and a v4 netmask as the prefix, so these do too).

def ip_version(text: str) -> int | None:
    """4 or 6 for a valid IP address in text form, else None."""
    try:
        inet_pton(AF_INET, text)
        return 4
    except (OSError, ValueError):
        pass
    addr, pct, scope = text.partition("%")
    if pct and (not scope or "%" in scope or "/" in scope):
        return None
    try:
        inet_pton(AF_INET6, addr)
        return 6
    except (OSError, ValueError):
        return None


def _prefix_len(text: str, version: int) -> int | None:
    """The prefix length that ipaddress reads from the text after the '/', else None."""
    if text.isascii() and text.isdigit():
        n = int(text)
        return n if n <= (32 if version == 4 else 128) else None
    if version == 4 and ip_version(text) == 4:  # a netmask (255.255.255.0) or hostmask
        n = int.from_bytes(inet_pton(AF_INET, text), "big")
        inv = ~n & 0xFFFFFFFF
        if inv & (inv + 1) == 0:  # 1s then 0s: a netmask (tried first, as ipaddress does)
            return 32 - inv.bit_length()
        if n & (n + 1) == 0:  # 0s then 1s: a hostmask
            return 32 - n.bit_length()
    return None


def _prefix_ok(text: str, version: int) -> bool:
    return _prefix_len(text, version) is not None


def _v6_text(packed: bytes) -> str:
    """An IPv6 address as ipaddress prints it (RFC 5952: lower-case groups without leading
    zeros, the longest run of two or more zero groups, the first of equal ones, as '::').
    inet_ntop differs for v4-mapped/compatible addresses, which it prints dotted."""
    groups = [f"{int.from_bytes(packed[i:i + 2], 'big'):x}" for i in range(0, 16, 2)]
    start, length, run = -1, 1, 0  # runs shorter than 2 stay as they are
    for i, g in enumerate(groups):
        run = run + 1 if g == "0" else 0
        if run > length:
            start, length = i - run + 1, run
    if start < 0:
        return ":".join(groups)
    return ":".join(groups[:start]) + "::" + ":".join(groups[start + length:])


class IPInterface(Record):
    """An address and its prefix length, as ipaddress.ip_interface() reads them: the same
    forms are accepted, and `ip` and str() give the text ipaddress would, so results,
    records and logs read the same as when ipaddress parsed them (~1.5 ms to import)."""

    __slots__ = ("ip", "version", "prefixlen", "scope")

    def __init__(self, ip: str, version: int, prefixlen: int, scope: str = "") -> None:
        self.ip = ip  # canonical text; like ipaddress's interface.ip, without the scope
        self.version = version
        self.prefixlen = prefixlen
        self.scope = scope  # a v6 zone ("eth0" of "fe80::1%eth0/64"), which str() shows

    @property
    def network(self) -> "IPInterface":
        """For code written against ipaddress: `iface.network.prefixlen` still reads."""
        return self

    def __str__(self) -> str:
        return f"{self.ip}%{self.scope}/{self.prefixlen}" if self.scope else f"{self.ip}/{self.prefixlen}"


def parse_interface(text: str) -> IPInterface:
    """ipaddress.ip_interface(text) for text (not the ints and bytes it also takes),
    without ipaddress; ValueError for what it refuses."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an interface address in text form")
    addr, slash, prefix = text.partition("/")
    version = ip_version(addr)
    plen = (32 if version == 4 else 128) if not slash else (
        _prefix_len(prefix, version) if version is not None else None)
    if version is None or plen is None:
        raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 interface")
    if version == 4:
        return IPInterface(addr, 4, plen)  # inet_pton takes no leading zeros: already canonical
    host, _pct, scope = addr.partition("%")
    return IPInterface(_v6_text(inet_pton(AF_INET6, host)), 6, plen, scope)


def _cidr(value: str, where: str) -> str:
    addr, slash, prefix = value.partition("/")
    version = ip_version(addr)
    if version is None or (slash and not _prefix_ok(prefix, version)):
        raise ResultError(f"{where} {value!r} is not an address in CIDR form")
    if not slash:
        raise ResultError(f"{where} {value!r} has no prefix length")
    return value


def _ip(value: str, where: str) -> str:
    if ip_version(value) is None:
        raise ResultError(f"{where} {value!r} is not an IP address")
    return value


def _objects(d: dict, key: str, where: str):
    """(where, item) for each item of the list d[key], each checked to be an object."""
    items = d.get(key) or []
    if not isinstance(items, list):
        raise ResultError(f"{where}.{key} must be a list")
    for i, raw in enumerate(items):
        w = f"{where}.{key}[{i}]"
        if not isinstance(raw, dict):
            raise ResultError(f"{w} must be an object")
        yield w, raw


class Result(Record):
    __slots__ = ("interfaces", "ips", "routes", "dns")

    def __init__(self, interfaces: list[Interface] | None = None, ips: list[IPConfig] | None = None,
                 routes: list[Route] | None = None, dns: DNS | None = None) -> None:
        self.interfaces = [] if interfaces is None else interfaces
        self.ips = [] if ips is None else ips
        self.routes = [] if routes is None else routes
        self.dns = DNS() if dns is None else dns

    @classmethod
    def from_dict(cls, d: object, where: str = "result") -> "Result":
        if not isinstance(d, dict):
            raise ResultError(f"{where} must be a JSON object")
        res = cls()
        for w, raw in _objects(d, "interfaces", where):
            res.interfaces.append(Interface(
                name=_str(raw, "name", w, required=True), mac=_str(raw, "mac", w),
                sandbox=_str(raw, "sandbox", w), mtu=_int(raw, "mtu", w),
                socket_path=_str(raw, "socketPath", w), pci_id=_str(raw, "pciID", w)))
        for w, raw in _objects(d, "ips", where):
            ipc = IPConfig(address=_cidr(_str(raw, "address", w, required=True), f"{w}.address"))
            gw = _str(raw, "gateway", w)
            ipc.gateway = _ip(gw, f"{w}.gateway") if gw else ""
            ipc.interface = _int(raw, "interface", w)
            if ipc.interface is not None and not 0 <= ipc.interface < len(res.interfaces):
                raise ResultError(f"{w}.interface {ipc.interface} is not an index into interfaces")
            fam = raw.get("version")
            if fam is not None and fam != ipc.family:
                raise ResultError(f"{w}.version {fam!r} does not match address {ipc.address}")
            res.ips.append(ipc)
        for w, raw in _objects(d, "routes", where):
            r = Route(dst=_cidr(_str(raw, "dst", w, required=True), f"{w}.dst"))
            gw = _str(raw, "gw", w)
            r.gw = _ip(gw, f"{w}.gw") if gw else ""
            for key in ROUTE_11_FIELDS:
                v = _int(raw, key, w)
                if v is not None:
                    r.extra[key] = v
            res.routes.append(r)
        res.dns = DNS.from_dict(d.get("dns"), f"{where}.dns")
        return res

    def to_dict(self, version: str) -> dict:
        new = versions.at_least(version, "1.1.0")
        legacy = versions.is_legacy(version)
        out: dict = {"cniVersion": version}
        if self.interfaces:
            lst = []
            for it in self.interfaces:
                d = {"name": it.name}
                if it.mac:
                    d["mac"] = it.mac
                if new and it.mtu is not None:
                    d["mtu"] = it.mtu
                if it.sandbox:
                    d["sandbox"] = it.sandbox
                if new and it.socket_path:
                    d["socketPath"] = it.socket_path
                if new and it.pci_id:
                    d["pciID"] = it.pci_id
                lst.append(d)
            out["interfaces"] = lst
        ips = []
        for ipc in self.ips:
            d = {}
            if legacy:
                d["version"] = ipc.family
            if ipc.interface is not None:
                d["interface"] = ipc.interface
            d["address"] = ipc.address
            if ipc.gateway:
                d["gateway"] = ipc.gateway
            ips.append(d)
        out["ips"] = ips
        if self.routes:
            rl = []
            for r in self.routes:
                d = {"dst": r.dst}
                if r.gw:
                    d["gw"] = r.gw
                if new:
                    d.update(r.extra)
                rl.append(d)
            out["routes"] = rl
        if not self.dns.is_empty():
            out["dns"] = self.dns.to_dict()
        return out

    def merged_after(self, prev: "Result | None") -> "Result":
        """This plugin's result appended to a previous plugin's (conflist chaining):
        interface indices shift by the number of interfaces already there."""
        if prev is None:
            return self
        shift = len(prev.interfaces)
        ips = [IPConfig(i.address, i.gateway, None if i.interface is None else i.interface + shift)
               for i in self.ips]
        return Result(interfaces=prev.interfaces + self.interfaces, ips=prev.ips + ips,
                      routes=prev.routes + self.routes,
                      dns=prev.dns if not prev.dns.is_empty() else self.dns)

    def sandbox_ips(self, ifname: str) -> list[IPConfig]:
        """The ips that belong to the sandbox interface `ifname` (or to no interface)."""
        out = []
        for ipc in self.ips:
            if ipc.interface is None:
                out.append(ipc)
                continue
            it = self.interfaces[ipc.interface]
            if it.name == ifname and it.sandbox:
                out.append(ipc)
        return out
