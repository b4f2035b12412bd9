"""Where a node's blocks come from: the datastore it claims them in, or Kubernetes.

- EtcdBackend: pools are IPPool records; a block is claimed by creating its BlockAffinity
  key with an etcd transaction that succeeds only while the key does not exist, so two
  nodes can never own one block, whatever the timing (the write is the datastore
  Publisher's, felix_agent/datastore/publisher.py).
- PodCIDRBackend: Kubernetes mode; the node's Node.spec.podCIDRs are its blocks, assigned
  by the controller manager, and nothing is ever claimed.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from felix_agent.datastore.etcd import EtcdStore
from felix_agent.datastore.publisher import Publisher
from felix_agent.model import BlockAffinity, IPPool

from felix_agent.ipam.blocks import parse_network


class IPAMBackend(Protocol):
    claims_blocks: bool  # False: the node's blocks are given (podCIDRs) and never claimed

    async def list_pools(self) -> list[IPPool]: ...

    async def list_affinities(self) -> list[BlockAffinity]:
        """Every block affinity of every node."""
        ...

    async def claim(self, affinity: BlockAffinity) -> bool:
        """Create the affinity if no node holds the block; True when this call created it."""
        ...

    async def unclaim(self, affinity: BlockAffinity) -> bool:
        """Delete the affinity if it still names affinity.node; True when deleted."""
        ...


class EtcdBackend:
    """IPAM on etcd: pools and affinities are read from the EtcdStore; claims are written
    through the datastore's Publisher (its create-only and compare-and-delete
    transactions)."""

    claims_blocks = True

    def __init__(self, store: EtcdStore, publisher: Publisher | None = None):
        self.store = store
        self.publisher = publisher or Publisher(store)

    async def list_pools(self) -> list[IPPool]:
        return [p for p in await self.store.get_all("IPPool") if isinstance(p, IPPool)]

    async def list_affinities(self) -> list[BlockAffinity]:
        return [a for a in await self.store.get_all("BlockAffinity") if isinstance(a, BlockAffinity)]

    async def claim(self, affinity: BlockAffinity) -> bool:
        return await self.publisher.claim_block(affinity)

    async def unclaim(self, affinity: BlockAffinity) -> bool:
        return await self.publisher.release_block(affinity)


class PodCIDRBackend:
    """Kubernetes mode: the blocks are the node's podCIDRs (set_pod_cidrs when they change)."""

    claims_blocks = False

    def __init__(self, node: str, pod_cidrs: Sequence[str] = ()):
        self.node = node
        self.pod_cidrs: tuple[str, ...] = ()
        self.set_pod_cidrs(pod_cidrs)

    def set_pod_cidrs(self, pod_cidrs: Sequence[str]) -> None:
        nets = [parse_network(c, f"node {self.node!r} podCIDR") for c in pod_cidrs]
        self.pod_cidrs = tuple(str(n) for n in nets)

    async def list_pools(self) -> list[IPPool]:
        return []

    async def list_affinities(self) -> list[BlockAffinity]:
        return [BlockAffinity(cidr=c, node=self.node, pool="") for c in self.pod_cidrs]

    async def claim(self, affinity: BlockAffinity) -> bool:
        return False

    async def unclaim(self, affinity: BlockAffinity) -> bool:
        return False
