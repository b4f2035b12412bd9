"""Block arithmetic: which blocks a pool holds and which addresses of a block are handed out.

Pure functions of CIDR strings, the same for IPv4 and IPv6, so they are table-tested
without a datastore.  Blocks are addressed by index inside their pool (block i starts at
pool.network + i * block_length) so a /8 pool with 262,144 blocks is never materialised.
"""
from __future__ import annotations

import hashlib
import ipaddress
from typing import Iterator, Union

from felix_agent.model import IPPool

from felix_agent.ipam.errors import IPAMConfigError

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def parse_network(cidr: str, what: str = "CIDR") -> Network:
    """A network with no host bits set, or IPAMConfigError saying what is wrong."""
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except (ValueError, TypeError) as e:
        raise IPAMConfigError(f"{what} {cidr!r} is not a valid network: {e}") from None


def pool_network(pool: IPPool) -> Network:
    """The pool's network, after checking that its block size fits inside it."""
    net = parse_network(pool.cidr, f"IP pool {pool.name!r} cidr")
    if not isinstance(pool.block_size, int) or not (net.prefixlen <= pool.block_size <= net.max_prefixlen):
        raise IPAMConfigError(
            f"IP pool {pool.name!r}: block size /{pool.block_size} must be between "
            f"/{net.prefixlen} (the pool's own prefix) and /{net.max_prefixlen}")
    return net


def block_count(pool: IPPool) -> int:
    net = pool_network(pool)
    return 1 << (pool.block_size - net.prefixlen)


def block_at(pool: IPPool, index: int) -> str:
    """The CIDR of block `index` of the pool."""
    net = pool_network(pool)
    if not 0 <= index < block_count(pool):
        raise IndexError(f"block {index} is outside pool {pool.name!r}")
    size = 1 << (net.max_prefixlen - pool.block_size)
    start = int(net.network_address) + index * size
    return f"{ipaddress.ip_address(start)}/{pool.block_size}"


def blocks_from(pool: IPPool, node: str) -> Iterator[str]:
    """Every block of the pool once, starting at an offset derived from the node name and
    wrapping around.  Nodes that start together then try different blocks first, so a
    cluster bring-up does not turn into every node racing for block 0."""
    n = block_count(pool)
    start = int.from_bytes(hashlib.sha1(node.encode()).digest()[:8], "big") % n
    for i in range(n):
        yield block_at(pool, (start + i) % n)


def usable_range(block: str) -> tuple[int, int]:
    """First and last handed-out address of a block, as integers (inclusive).

    The first and last address of every block are skipped (network- and broadcast-like):
    pods are /32 so the kernel would not mind, but some software refuses .0 or .255, and
    in Kubernetes mode a node's podCIDR is a real subnet whose edges host-local skips too.
    /31, /32 (and /127, /128) blocks have no such edges and use every address."""
    net = ipaddress.ip_network(block)
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.max_prefixlen - net.prefixlen <= 1:
        return first, last
    return first + 1, last - 1


def block_capacity(block: str) -> int:
    first, last = usable_range(block)
    return last - first + 1


def next_free(block: str, used: set[str], after: str | None = None) -> str | None:
    """The next free address of the block after `after` (round-robin, wrapping), or None
    when the block is full.  Round-robin rather than lowest-first so that an address
    released a moment ago is the last to be reused: stale conntrack entries and peers'
    caches for the old pod then have time to go."""
    first, last = usable_range(block)
    span = last - first + 1
    if len(used) >= span:
        # Quick exit for a full block (used only ever holds addresses of this block).
        return None
    version = ipaddress.ip_network(block).version
    start = first
    if after is not None:
        a = int(ipaddress.ip_address(after))
        if first <= a <= last:
            start = a + 1 if a < last else first
    for k in range(span):
        cand = first + (start - first + k) % span
        text = str(ipaddress.ip_address(cand) if version == 4 else ipaddress.IPv6Address(cand))
        if text not in used:
            return text
    return None
