"""Names and marks of the iptables/ipset layout (Calico's on-host conventions).

Every chain the calc produces starts with "cali-" and fits iptables' 28-character limit;
every ipset starts with "cali40" (4 = IPv4, 0 = layout version) or, for its IPv6 twin
(family inet6, same meaning, IPv6 members), "cali60", and fits ipset's 31.  The chains keep
the same names in iptables and ip6tables.
"""
from __future__ import annotations

CHAIN_NAME_MAX = 28
IPSET_NAME_MAX = 31

# Host side of every workload veth; also the `-i cali+` / `-o cali+` wildcard.
WL_IFACE_PREFIX = "cali"
WL_IFACE_WILDCARD = WL_IFACE_PREFIX + "+"

# Policy chains set this bit when a rule allows the packet and endpoint chains test it.
# 0x10000 is Calico's default accept bit; kube-proxy uses 0x4000/0x8000, so no clash.
ACCEPT_MARK = 0x10000
SET_ACCEPT_MARK = f"-j MARK --set-xmark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x}"
CLEAR_ACCEPT_MARK = f"-j MARK --set-xmark 0x0/{ACCEPT_MARK:#x}"
IF_ACCEPTED = f"-m mark --mark {ACCEPT_MARK:#x}/{ACCEPT_MARK:#x}"
RETURN_IF_ACCEPTED = IF_ACCEPTED + " -j RETURN"
# A cluster policy's Pass rule sets this bit: the rest of its tier is skipped (Calico's
# pass bit).  Endpoint chains clear both bits before the tiers.
PASS_MARK = 0x20000
SET_PASS_MARK = f"-j MARK --set-xmark {PASS_MARK:#x}/{PASS_MARK:#x}"
CLEAR_PASS_MARK = f"-j MARK --set-xmark 0x0/{PASS_MARK:#x}"
CLEAR_TIER_MARKS = f"-j MARK --set-xmark 0x0/{ACCEPT_MARK | PASS_MARK:#x}"
IF_PASSED = f"-m mark --mark {PASS_MARK:#x}/{PASS_MARK:#x}"
IF_NOT_PASSED = f"-m mark --mark 0x0/{PASS_MARK:#x}"
RETURN_IF_PASSED = IF_PASSED + " -j RETURN"
# cali-FORWARD sets this bit on workload traffic its checks allowed and returns, so the
# rest of FORWARD (kube-proxy's REJECT of a Service without endpoints, the host's own
# rules) still sees the packet; our last rule in FORWARD accepts what carries it (Felix
# does the same with its accept bit).  Clear of the tiers' bits and kube-proxy's.
FORWARD_MARK = 0x40000
SET_FORWARD_MARK = f"-j MARK --set-xmark {FORWARD_MARK:#x}/{FORWARD_MARK:#x}"
CLEAR_FORWARD_MARK = f"-j MARK --set-xmark 0x0/{FORWARD_MARK:#x}"
IF_FORWARDED = f"-m mark --mark {FORWARD_MARK:#x}/{FORWARD_MARK:#x}"

# --- filter table ------------------------------------------------------------------------
FILTER_INPUT = "cali-INPUT"
FILTER_FORWARD = "cali-FORWARD"
FILTER_FORWARD_ACCEPT = "cali-FORWARD-accept"  # the bottom hook of FORWARD
FILTER_OUTPUT = "cali-OUTPUT"
WL_TO_HOST = "cali-wl-to-host"
FROM_WL_DISPATCH = "cali-from-wl-dispatch"
TO_WL_DISPATCH = "cali-to-wl-dispatch"

# --- nat table ---------------------------------------------------------------------------
NAT_PREROUTING = "cali-PREROUTING"
NAT_OUTPUT = "cali-OUTPUT"
NAT_POSTROUTING = "cali-POSTROUTING"
FIP_DNAT = "cali-fip-dnat"
FIP_SNAT = "cali-fip-snat"
NAT_OUTGOING = "cali-nat-outgoing"

# --- raw table (IPv4 and IPv6) ---------------------------------------------------------------
# The loopback guard: drops pod packets addressed to the node's loopback before routing.
RAW_PREROUTING = "cali-PREROUTING"

# --- ipsets ------------------------------------------------------------------------------
SELECTOR_SET_PREFIX = "cali40s:"  # hash:net, pod IPs a selector picks
NAMED_PORT_SET_PREFIX = "cali40n:"  # hash:ip,port, "ip,proto:port" of a named port
NETS_SET_PREFIX = "cali40e:"  # hash:net, the `except` CIDRs of an ipBlock
NODES_SET_PREFIX = "cali40h:"  # hash:net, addresses of the nodes a cluster policy's nodes peer picks
ALL_POOLS_SET = "cali40all-ipam-pools"
MASQ_POOLS_SET = "cali40masq-ipam-pools"
ALL_HOSTS_SET = "cali40all-hosts-net"
WL_SOURCES_SET = "cali40wl-src"  # hash:net,iface, "<ip>,<cali iface>" of wired local pods
SET_PREFIX_V4, SET_PREFIX_V6 = "cali40", "cali60"


def family_set_name(name: str, family: int) -> str:
    """A set's name for IP `family`: "cali40s:x" stays for 4 and becomes "cali60s:x" for 6."""
    if family == 4:
        return name
    assert family == 6 and name.startswith(SET_PREFIX_V4), (name, family)
    return SET_PREFIX_V6 + name[len(SET_PREFIX_V4):]


def ipset_family(family: int) -> str:
    """ipset's word for IP `family` (4 or 6)."""
    return "inet" if family == 4 else "inet6"


def to_wl_chain(iface: str) -> str:
    """Ingress of the workload behind `iface` (traffic going *to* it)."""
    return "cali-tw-" + iface


def from_wl_chain(iface: str) -> str:
    """Egress of the workload behind `iface` (traffic coming *from* it)."""
    return "cali-fw-" + iface


def policy_chain(policy_id: str, direction: str) -> str:
    """cali-pi-<id> for ingress rules, cali-po-<id> for egress rules."""
    return ("cali-pi-" if direction == "ingress" else "cali-po-") + policy_id


def tier_chain(policy_id: str, direction: str) -> str:
    """cali-ci-<id> / cali-co-<id>: a cluster policy's ingress / egress rules."""
    return ("cali-ci-" if direction == "ingress" else "cali-co-") + policy_id


def dispatch_subchain(base: str, key: str) -> str:
    """A slice of a dispatch chain holding the interfaces that start with cali<key>."""
    return f"{base}-{key}"
