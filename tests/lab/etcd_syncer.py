"""A real EtcdSyncer on the lab's etcd, for the tests of the watch's fault handling."""
from __future__ import annotations

import asyncio
import time

from felix_agent.datastore.etcd import EtcdStore, EtcdSyncer
from felix_agent.model import Namespace, SyncStatus


async def synced_syncer(port: int, prefix: str, timeout: float) -> tuple[EtcdStore, EtcdSyncer, list, asyncio.Task]:
    """A store on 127.0.0.1:`port` holding Namespace "before" under `prefix`, and an
    EtcdSyncer on it, probing its watch every second, running until its first sync; its
    events collect in the returned list.  The caller cancels the task and closes the store."""
    store = EtcdStore("127.0.0.1", port, prefix, timeout=timeout)
    await store.put_record(Namespace(name="before"))
    syncer = EtcdSyncer(store)
    syncer.probe_interval = 1.0
    events: list = []
    task = asyncio.create_task(syncer.run(events.append), name="syncer")
    deadline = time.monotonic() + 10
    while not any(isinstance(ev, SyncStatus) and ev.in_sync for ev in events):
        if time.monotonic() > deadline:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
            raise AssertionError("no first sync")
        await asyncio.sleep(0.05)
    return store, syncer, events, task
