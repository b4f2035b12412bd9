"""Rule bodies in exactly the form `iptables-save` prints them back.

Keeping that form (option order -s -d -i -o -p, then matches, then target; /32 kept,
/0 dropped, host bits cleared) means a driver can compare what it wrote with what it reads
without a parser.  tests/integration/test_calc_iptables_restore.py proves the round trip
on iptables-nft and iptables-legacy.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable


def cidr_match_text(cidr: str) -> str:
    """A CIDR as iptables-save prints it after -s/-d ("" for /0, which it omits)."""
    net = ipaddress.ip_network(cidr, strict=False)
    return "" if net.prefixlen == 0 else str(net)


def rule(target: str, *, src: str = "", dst: str = "", in_iface: str = "", out_iface: str = "",
         proto: str = "", matches: Iterable[str] = ()) -> str:
    """One rule body (the text after "-A <chain> ").  `target` is the whole tail, e.g.
    "-j DROP", "-g cali-fw-cali123", "-j MARK --set-xmark ...", or "" for none."""
    parts = []
    if src:
        parts.append(f"-s {src}")
    if dst:
        parts.append(f"-d {dst}")
    if in_iface:
        parts.append(f"-i {in_iface}")
    if out_iface:
        parts.append(f"-o {out_iface}")
    if proto:
        parts.append(f"-p {proto}")
    parts.extend(m for m in matches if m)
    if target:
        parts.append(target)
    return " ".join(parts)


def host(ip: str) -> str:
    """An address as a /32 source or destination match."""
    return f"{ip}/32"
