"""What the CNI service answers: the result of an ADD (its interfaces, /32 or /128
addresses and default routes through the fixed gateway) and, for a failure, the CNI error
code the runtime acts on."""
from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from podnet.errors import DATAPLANE_FAILURE, IO_FAILURE, IPAM_FAILURE, TRY_AGAIN_LATER, CNIError
from podnet.layout import GATEWAY_V4, GATEWAY_V6, HOST_MAC
from podnet.result import Route

from felix_agent.ipam import IPAMConfigError, IPAMError, IPAMExhausted, NoUsablePool


def host_mac_of(info: Any) -> tuple[str, str]:
    """(host mac, container mac) from whatever plumbing.setup returned."""
    if not isinstance(info, dict):
        return HOST_MAC, ""
    host = info.get("host_mac") or HOST_MAC
    cont = info.get("container_mac") or info.get("mac") or ""
    return str(host), str(cont)


def host_cidr(ip: str) -> str:
    return f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}"


def default_routes(cidrs: list[str]) -> list[Route]:
    routes = []
    fams = {ipaddress.ip_interface(c).version for c in cidrs}
    if 4 in fams:
        routes.append(Route(dst="0.0.0.0/0", gw=GATEWAY_V4))
    if 6 in fams:
        routes.append(Route(dst="::/0", gw=GATEWAY_V6))
    return routes


def as_cni_error(e: BaseException, command: str) -> CNIError:
    """One place that says which CNI code each failure gets."""
    if isinstance(e, CNIError):
        return e
    if isinstance(e, (IPAMExhausted, NoUsablePool)):
        # 11: the runtime retries later, and a freed address or a new pool can fix it.
        # Both messages name the pool (or the node's podCIDRs) and say "exhausted"/"no pool".
        return CNIError(TRY_AGAIN_LATER, str(e))
    if isinstance(e, IPAMConfigError):
        return CNIError(IPAM_FAILURE, f"IPAM: {e}")
    if isinstance(e, IPAMError):
        return CNIError(IO_FAILURE, f"IPAM state: {e}")
    if isinstance(e, ConnectionError):
        # The datastore (etcd) is unreachable while a block had to be claimed: transient.
        return CNIError(TRY_AGAIN_LATER, f"{command} failed: datastore unavailable: {e}")
    if isinstance(e, OSError):
        return CNIError(DATAPLANE_FAILURE, f"{command} failed: {e}")
    if isinstance(e, asyncio.CancelledError):
        # Not the agent stopping (that re-raises): a call below was cancelled under us.
        return CNIError(TRY_AGAIN_LATER, f"{command} failed: an internal call was cancelled "
                                         "(datastore connection lost?)")
    return CNIError(DATAPLANE_FAILURE, f"{command} failed: {type(e).__name__}: {e}")
