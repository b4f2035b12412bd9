"""The errors IPAM raises; the local API maps each to a CNI error code."""
from __future__ import annotations


class IPAMError(Exception):
    """Base of every IPAM failure."""


class IPAMConfigError(IPAMError, ValueError):
    """A pool, block or request argument is malformed; nothing was changed."""


class IPAMExhausted(IPAMError):
    """No free address: every block this node owns is full and no block can be claimed."""


class NoUsablePool(IPAMError):
    """There is no enabled pool (or, in Kubernetes mode, no podCIDR) to allocate from."""


class StateDirInUse(IPAMError):
    """Another IPAM instance (this process or another) holds the state directory."""
