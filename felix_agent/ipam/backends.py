"""Where a node's blocks come from: the datastore it claims them in, or Kubernetes.

- EtcdBackend: pools are IPPool records; a block is claimed by creating its BlockAffinity
  key with an etcd transaction that succeeds only while the key does not exist, so two
  nodes can never own one block, whatever the timing.
- PodCIDRBackend: Kubernetes mode; the node's Node.spec.podCIDRs are its blocks, assigned
  by the controller manager, and nothing is ever claimed.
"""
from __future__ import annotations

import json
import logging
from typing import Protocol, Sequence

from felix_agent.datastore.keys import DEFAULT_PREFIX, object_key
from felix_agent.model import BlockAffinity, IPPool

from felix_agent.ipam.blocks import parse_network

log = logging.getLogger("tortie.ipam")


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
    """IPAM on an felix_agent.datastore.etcd.EtcdStore (pools and affinities as records)."""

    claims_blocks = True

    def __init__(self, store):
        self.store = store
        self.prefix = getattr(store, "prefix", DEFAULT_PREFIX)

    async def list_pools(self) -> list[IPPool]:
        return [p for p in await self.store.get_all("IPPool") if isinstance(p, IPPool)]

    async def list_affinities(self) -> list[BlockAffinity]:
        return [a for a in await self.store.get_all("BlockAffinity") if isinstance(a, BlockAffinity)]

    def _key(self, cidr: str) -> str:
        return object_key(self.prefix, "BlockAffinity", cidr)

    @staticmethod
    def _value(affinity: BlockAffinity) -> str:
        # The same Kubernetes-shaped JSON every record has, so the Syncer's watch decodes
        # a claim like any other BlockAffinity event.
        from felix_agent.datastore.convert import to_k8s
        return json.dumps(to_k8s(affinity), separators=(",", ":"), sort_keys=True)

    async def claim(self, affinity: BlockAffinity) -> bool:
        return bool(await self.store.create_if_absent(self._key(affinity.cidr), self._value(affinity)))

    async def unclaim(self, affinity: BlockAffinity) -> bool:
        from felix_agent.datastore.convert import from_k8s
        key = self._key(affinity.cidr)
        value = await self.store.get_value(key)
        if value is None:
            return False
        try:
            current = from_k8s(json.loads(value))
        except Exception:  # noqa: BLE001 - a record we cannot read is not ours to delete
            log.warning("block affinity %s holds an unreadable value; not deleting it", key)
            return False
        if not isinstance(current, BlockAffinity) or current.node != affinity.node:
            return False
        # Compare-and-delete on the exact bytes read: if another node re-claimed the block
        # in between, its value differs and the delete does nothing.
        return bool(await self.store.delete_if_value(key, value))


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
