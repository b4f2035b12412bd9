"""Host-side interface names (stdlib only: the agent and the binary both use it).

Calico's convention: "cali" + the first 11 hex characters of sha1("<namespace>.<pod>"),
15 characters in all, the kernel's limit.  The name depends only on the pod, so a
restarted sandbox of the same pod finds (and replaces) its old veth.

The digest comes from `_sha1`, CPython's own SHA-1 (the same digest): `hashlib` loads
OpenSSL's libcrypto first, ~3 ms at every start of the binary for 20 bytes of hash.
"""
from __future__ import annotations

from _sha1 import sha1

PREFIX = "cali"
DEFAULT_IFNAME = "eth0"


def _name(key: str) -> str:
    return PREFIX + sha1(key.encode()).hexdigest()[:11]


def host_iface_name(namespace: str, pod: str, ifname: str = DEFAULT_IFNAME) -> str:
    """The host veth for a pod's attachment.  A second attachment of the same pod (ifname
    other than eth0, e.g. net1) gets its ifname in the hash so the two never collide."""
    if ifname == DEFAULT_IFNAME:
        return _name(f"{namespace}.{pod}")
    return _name(f"{namespace}.{pod}.{ifname}")


def host_iface_name_for_container(container_id: str, ifname: str = DEFAULT_IFNAME) -> str:
    """Without Kubernetes args (a bare runtime such as cnitool) the container id names it."""
    if ifname == DEFAULT_IFNAME:
        return _name(container_id)
    return _name(f"{container_id}.{ifname}")


def host_iface_for(k8s_namespace: str | None, k8s_pod: str | None, container_id: str,
                   ifname: str = DEFAULT_IFNAME) -> str:
    if k8s_namespace and k8s_pod:
        return host_iface_name(k8s_namespace, k8s_pod, ifname)
    return host_iface_name_for_container(container_id, ifname)
