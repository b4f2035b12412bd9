"""Publisher: every write the agent makes to the datastore, one method per kind of write.

etcd mode only: in Kubernetes mode the agent writes nothing (Nodes and Pods are the
kubelet's and the controller manager's, a node's blocks are its podCIDRs).  tortiectl
writes the user's objects through EtcdStore itself; everything an agent writes goes
through here, so what the agent may change in a cluster is this one page:

- this node's WorkloadEndpoints (the copies other nodes' policies match on), removed
  with compare-and-delete so that a newer write of the same key always wins;
- this node's Node record (address, AS, tunnel addresses);
- the node's IPAM block claims: create-only and compare-and-delete transactions, so two
  nodes never own one block whatever the timing.
"""
from __future__ import annotations

import json
import logging
from typing import Callable

from felix_agent.datastore import keys
from felix_agent.datastore.convert import from_k8s
from felix_agent.datastore.etcd import EtcdStore, encode_record, record_key
from felix_agent.model import BlockAffinity, Node, WorkloadEndpoint

log = logging.getLogger("tortie.datastore")


class Publisher:
    def __init__(self, store: EtcdStore):
        self.store = store

    @property
    def prefix(self) -> str:
        return getattr(self.store, "prefix", keys.DEFAULT_PREFIX)

    def own_endpoints_prefix(self, node: str) -> str:
        """Where this node's endpoints are kept: only its agent writes below it."""
        return f"{self.prefix}/{keys.PLURAL['WorkloadEndpoint']}/{node}/"

    # -- this node's endpoints ------------------------------------------------------------

    async def put_endpoint(self, wep: WorkloadEndpoint) -> None:
        await self.store.put_record(wep)

    async def remove_endpoint(self, old: WorkloadEndpoint, still_served: Callable[[], bool]) -> None:
        """Delete the copy of `old` unless the key was written again meanwhile: compare-
        and-delete on the bytes published; if the key holds other bytes (a copy garbled or
        rewritten by an older agent), delete those only while the node still does not
        serve the endpoint (an ADD that registers it meanwhile wins)."""
        key = record_key(self.prefix, old)
        if await self.store.delete_if_value(key, encode_record(old)):
            return
        raw = await self.store.get_value(key)
        if raw is not None and not still_served():
            await self.store.delete_if_value(key, raw)

    async def remove_malformed(self, key: str, raw: bytes) -> bool:
        """Delete a key that holds no valid record, only while it still holds `raw` (a
        valid write meanwhile stays)."""
        return bool(await self.store.delete_if_value(key, raw))

    # -- this node's Node record ----------------------------------------------------------

    async def put_node(self, node: Node) -> None:
        await self.store.put_record(node)

    # -- IPAM block claims ----------------------------------------------------------------

    async def claim_block(self, affinity: BlockAffinity) -> bool:
        """Create the block's affinity if no node holds it; True when this call created it.
        The value is the record's usual stored form, so the Syncer's watch decodes a claim
        like any other BlockAffinity event."""
        key = record_key(self.prefix, affinity)
        return bool(await self.store.create_if_absent(key, encode_record(affinity)))

    async def release_block(self, affinity: BlockAffinity) -> bool:
        """Delete the block's affinity if it still names affinity.node; True when deleted."""
        key = record_key(self.prefix, affinity)
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
