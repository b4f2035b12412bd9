"""Tunnel devices: vxlan.calico and vxlan-v6.calico (VXLAN) and tunl0 (IPIP), reconciled
over netlink.

VxlanDevice owns the whole vxlan.calico device: its link attributes, its one /32
address, and every permanent FDB and neighbour entry on it.  apply() reads the kernel
each time, so anything changed behind our back (an entry deleted, the MTU altered, the
device removed or created with the wrong VNI) is put back on the next call.  Attributes
the kernel cannot change in place (VNI, port, local address, learning, parent link)
mean delete and recreate.

VxlanDevice(version=6) is vxlan-v6.calico: the same device over the IPv6 underlay (the
uplink's first global IPv6 address as source, FDB entries to the peers' IPv6 addresses),
with a /128 VTEP address and IPv6 neighbours, as Calico runs a second device for IPv6.

IpipDevice manages tunl0's address.  tunl0 exists only when the kernel has the ipip
module; without it apply() raises KernelModuleMissing("kernel module ipip is not
available ..."), and data-path tests turn that into a skip.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from felix_agent.calc.desired import FDBEntry, Neighbor
from felix_agent.calc.routes import IPIP_DEVICE, VXLAN_DEVICES, ip_address, ipv4_address

VXLAN_VNI = 4096
VXLAN_PORT = 4789
# Per underlay family: the same VNI and port as Calico (the kernel keeps one UDP socket
# per family, so both devices share them); outer IPv4 (20) or IPv6 (40) + UDP (8) +
# VXLAN (8) + inner Ethernet (14).
VXLAN_OVERHEAD = {4: 50, 6: 70}
NUD_PERMANENT = ndmsg.states["permanent"]
AF_INET = 2
AF_INET6 = 10
FAMILY = {4: AF_INET, 6: AF_INET6}
HOST_PREFIX = {4: 32, 6: 128}
IFA_F_NODAD = 0x02
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class TunnelError(RuntimeError):
    pass


class KernelModuleMissing(TunnelError):
    """The kernel cannot make this kind of device; `module` names what is missing."""

    def __init__(self, module: str, detail: str = ""):
        self.module = module
        super().__init__(f"kernel module {module} is not available" + (f" ({detail})" if detail else ""))


def _mac(mac: str, what: str) -> str:
    m = mac.strip().lower()
    if not _MAC.match(m):
        raise ValueError(f"{what}: {mac!r} is not a MAC address like 66:11:22:33:44:55")
    if int(m[:2], 16) & 1:
        raise ValueError(f"{what}: {mac!r} is a multicast MAC")
    return m


@dataclass(frozen=True)
class VxlanSpec:
    addr: str
    mac: str
    uplink: str
    mtu: int | None  # None: uplink MTU - 50
    local: str  # "" : the uplink's first IPv4 address
    fdb: frozenset[FDBEntry] = field(default_factory=frozenset)
    neighbors: frozenset[Neighbor] = field(default_factory=frozenset)


class VxlanDevice:
    """Desired state of vxlan.calico in `netns` (None: the current namespace)."""

    def __init__(self, netns: str | None = None, name: str = "", version: int = 4):
        self.netns = netns
        self.version = version
        self.name = name or VXLAN_DEVICES[version]
        self._spec: VxlanSpec | None = None

    def set_desired(self, addr: str, mac: str, uplink: str, mtu: int | None = None,
                    fdb: Iterable[FDBEntry] = (), neighbors: Iterable[Neighbor] = (),
                    *, local: str = "") -> None:
        """Record what the device should look like (no kernel access).  Bad input raises
        ValueError and leaves the previous desired state in place."""
        if not uplink or "/" in uplink or len(uplink) > 15:
            raise ValueError(f"uplink {uplink!r} is not an interface name")
        if mtu is not None and not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} is out of range 68..65535")
        v = self.version
        fdb_n = frozenset(FDBEntry(mac=_mac(e.mac, "FDB entry"), dst=ip_address(e.dst, "FDB entry", v), dev=self.name)
                          for e in fdb)
        nb_n = frozenset(Neighbor(ip=ip_address(n.ip, "neighbour", v), mac=_mac(n.mac, "neighbour"), dev=self.name)
                         for n in neighbors)
        self._spec = VxlanSpec(addr=ip_address(addr, "VTEP address", v), mac=_mac(mac, "VTEP MAC"), uplink=uplink,
                               mtu=mtu, local=ip_address(local, "local address", v) if local else "",
                               fdb=fdb_n, neighbors=nb_n)

    def remove(self) -> bool:
        """Delete the device (mode changed away from vxlan). True when it existed."""
        self._spec = None
        with _ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if idx:
                ipr.link("del", index=idx[0])
                return True
        return False

    def apply(self) -> list[str]:
        """Reconcile the kernel with the desired state; returns what was changed (empty
        when nothing was).  Errors before the first change leave the kernel untouched."""
        s = self._spec
        if s is None:
            raise TunnelError("VxlanDevice.apply() before set_desired()")
        changes: list[str] = []
        with _ipr(self.netns) as ipr:
            up = ipr.link_lookup(ifname=s.uplink)
            if not up:
                raise TunnelError(f"uplink {s.uplink!r} does not exist; vxlan.calico not changed")
            up_idx = up[0]
            up_link = ipr.get_links(up_idx)[0]
            local = s.local or _first_address(ipr, up_idx, self.version)
            if not local:
                raise TunnelError(f"uplink {s.uplink!r} has no IPv{self.version} address to use as VXLAN source")
            mtu = s.mtu or up_link.get("mtu") - VXLAN_OVERHEAD[self.version]
            idx = self._reconcile_link(ipr, s, up_idx, local, mtu, changes)
            self._reconcile_addr(ipr, idx, s.addr, changes)
            self._reconcile_fdb(ipr, idx, s.fdb, changes)
            self._reconcile_neighbors(ipr, idx, s.neighbors, changes)
        return changes

    def _reconcile_link(self, ipr, s: VxlanSpec, up_idx: int, local: str, mtu: int, changes: list[str]) -> int:
        found = ipr.link_lookup(ifname=self.name)
        if found:
            link = ipr.get_links(found[0])[0]
            info = link.get("IFLA_LINKINFO")
            kind = info.get("IFLA_INFO_KIND") if info else None
            data = info.get("IFLA_INFO_DATA") if info else None
            fixed = kind == "vxlan" and data is not None and (
                data.get("IFLA_VXLAN_ID") == VXLAN_VNI and data.get("IFLA_VXLAN_PORT") == VXLAN_PORT
                and data.get("IFLA_" + self._local_attr.upper()) == local and not data.get("IFLA_VXLAN_LEARNING")
                and data.get("IFLA_VXLAN_LINK") == up_idx)
            if not fixed:
                ipr.link("del", index=found[0])
                changes.append(f"deleted {self.name} (wrong kind or fixed attributes)")
                found = []
        if not found:
            ipr.link("add", ifname=self.name, kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_port=VXLAN_PORT,
                     vxlan_learning=0, vxlan_link=up_idx, address=s.mac, mtu=mtu, **{self._local_attr: local})
            changes.append(f"created {self.name} vni {VXLAN_VNI} local {local} mtu {mtu}")
            found = ipr.link_lookup(ifname=self.name)
        idx = found[0]
        link = ipr.get_links(idx)[0]
        if link.get("address") != s.mac:
            ipr.link("set", index=idx, address=s.mac)
            changes.append(f"mac {s.mac}")
        if link.get("mtu") != mtu:
            ipr.link("set", index=idx, mtu=mtu)
            changes.append(f"mtu {mtu}")
        if not link["flags"] & 1:  # IFF_UP
            ipr.link("set", index=idx, state="up")
            changes.append("up")
        return idx

    @property
    def _local_attr(self) -> str:
        return "vxlan_local" if self.version == 4 else "vxlan_local6"

    def _reconcile_addr(self, ipr, idx: int, addr: str, changes: list[str]) -> None:
        plen = HOST_PREFIX[self.version]
        have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=FAMILY[self.version])
                if not a.get("IFA_ADDRESS", "").startswith("fe80:")}  # the kernel's link-local stays
        for a, p in have - {(addr, plen)}:
            ipr.addr("del", index=idx, address=a, prefixlen=p)
            changes.append(f"address -{a}/{p}")
        if (addr, plen) not in have:
            # IPv6: no duplicate address detection (the VTEP address is the node's own block's)
            ipr.addr("add", index=idx, address=addr, prefixlen=plen, **({"flags": IFA_F_NODAD} if plen == 128 else {}))
            changes.append(f"address +{addr}/{plen}")

    def _reconcile_fdb(self, ipr, idx: int, want: frozenset[FDBEntry], changes: list[str]) -> None:
        have = set()
        for m in ipr.fdb("dump", ifindex=idx):
            if m["ifindex"] == idx and m["state"] & NUD_PERMANENT:
                have.add((m.get("NDA_LLADDR"), m.get("NDA_DST")))
        wanted = {(e.mac, e.dst) for e in want}
        for mac, dst in have - wanted:
            kw = {"dst": dst} if dst else {}
            ipr.fdb("del", ifindex=idx, lladdr=mac, **kw)
            changes.append(f"fdb -{mac} {dst}")
        for mac, dst in sorted(wanted - have):
            # append (NLM_F_APPEND) adds this destination without touching other
            # entries of the same MAC, which the stale pass above already settled.
            ipr.fdb("append", ifindex=idx, lladdr=mac, dst=dst)
            changes.append(f"fdb +{mac} {dst}")

    def _reconcile_neighbors(self, ipr, idx: int, want: frozenset[Neighbor], changes: list[str]) -> None:
        have = {}
        for m in ipr.neigh("dump", ifindex=idx, family=FAMILY[self.version]):
            if m["ifindex"] == idx and m["state"] & NUD_PERMANENT:
                have[m.get("NDA_DST")] = m.get("NDA_LLADDR")
        wanted = {n.ip: n.mac for n in want}
        for ip in sorted(set(have) - set(wanted)):
            ipr.neigh("del", ifindex=idx, dst=ip)
            changes.append(f"neigh -{ip}")
        for ip, mac in sorted(wanted.items()):
            if have.get(ip) != mac:
                ipr.neigh("replace", ifindex=idx, dst=ip, lladdr=mac, state=NUD_PERMANENT)
                changes.append(f"neigh {ip} {mac}")


def _ipr(netns: str | None) -> IPRoute:
    # flags=0: never create the namespace (pyroute2's default would, on a typo).
    return IPRoute(netns=netns, flags=0) if netns else IPRoute()


def _first_address(ipr, idx: int, version: int = 4) -> str:
    """The first address of IP version `version` on link `idx` (IPv6: of global scope)."""
    for a in ipr.get_addr(index=idx, family=FAMILY[version]):
        if version == 4 or a["scope"] == 0:
            return a.get("IFA_ADDRESS")
    return ""


class IpipDevice:
    """tunl0 with one /32 address (the node's ipip tunnel address)."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._addr: str | None = None

    def set_desired(self, addr: str) -> None:
        self._addr = ipv4_address(addr, "IPIP tunnel address")

    def available(self) -> bool:
        try:
            self._lookup_or_probe()
            return True
        except KernelModuleMissing:
            return False

    def _lookup_or_probe(self) -> int:
        """tunl0's index.  The ipip module creates tunl0 in every namespace when it loads,
        so its absence means no module; creating an ipip link would load it where
        module autoloading works, so try that once before giving up."""
        with _ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=IPIP_DEVICE)
            if idx:
                return idx[0]
            probe = "tortieprobe0"
            try:
                ipr.link("add", ifname=probe, kind="ipip")
            except NetlinkError as e:
                raise KernelModuleMissing("ipip", f"cannot create an ipip link: {e.args[-1]}") from None
            ipr.link("del", ifname=probe)
            idx = ipr.link_lookup(ifname=IPIP_DEVICE)
            if not idx:
                raise KernelModuleMissing("ipip", "tunl0 did not appear")
            return idx[0]

    def apply(self) -> list[str]:
        if self._addr is None:
            raise TunnelError("IpipDevice.apply() before set_desired()")
        idx = self._lookup_or_probe()
        changes: list[str] = []
        with _ipr(self.netns) as ipr:
            have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=AF_INET)}
            for a, plen in have - {(self._addr, 32)}:
                ipr.addr("del", index=idx, address=a, prefixlen=plen)
                changes.append(f"address -{a}/{plen}")
            if (self._addr, 32) not in have:
                ipr.addr("add", index=idx, address=self._addr, prefixlen=32)
                changes.append(f"address +{self._addr}/32")
            link = ipr.get_links(idx)[0]
            if not link["flags"] & 1:
                ipr.link("set", index=idx, state="up")
                changes.append("up")
        return changes
