"""The raw table: the loopback guard, the same for IPv4 and IPv6.

A pod owns its network namespace and may send any frame to its gateway MAC, including
one addressed to 127.0.0.1 or ::1.  With route_localnet set on the host side the kernel
would deliver such a packet to whatever listens on the node's loopback (the class of
CVE-2020-8558); the CNI plumbing keeps route_localnet off and the agent resets it, and
this guard drops the packets before any routing decision whatever the sysctls say.  No
legitimate pod packet is addressed to loopback before NAT (floating IPs DNAT to pod
addresses, in nat PREROUTING, after raw), so the rule needs no exception.

For IPv6 the kernel already discards a packet to ::1 arriving on a non-loopback device
before netfilter sees it (RFC 4291 2.5.3, ip6_rcv_core); the ip6tables rule is defence
in depth for a kernel that would not.
"""
from __future__ import annotations

from felix_agent.calc.desired import Hook
from felix_agent.calc.names import RAW_PREROUTING, WL_IFACE_WILDCARD

LOOPBACK_V4 = "127.0.0.0/8"
LOOPBACK_V6 = "::1/128"

HOOKS = (Hook("raw", "PREROUTING", RAW_PREROUTING),)


def raw_chains(ip_version: int) -> dict[str, tuple[str, ...]]:
    """The raw table's chains for iptables (4) or ip6tables (6)."""
    dst = LOOPBACK_V4 if ip_version == 4 else LOOPBACK_V6
    return {RAW_PREROUTING: (f"-i {WL_IFACE_WILDCARD} -d {dst} -j DROP",)}
