"""The etcd datastore at cluster size, against a real etcd on loopback: a 10,000-pod cluster
(the scale benchmark's generator: 500 nodes, 1,000 policies, ~22,600 keys, ~9 MB of JSON,
more than gRPC's default 4 MiB reply) syncs with the shipped defaults, because the list
comes in bounded pages; and a page of objects too big for the receive limit is fetched
again in smaller pages instead of failing forever. No root needed."""
from __future__ import annotations

import asyncio

from felix_agent.datastore.etcd import LIST_PAGE_KEYS, EtcdStore, EtcdSyncer
from felix_agent.model import KIND_OF, SyncStatus, Update
from tests.bench.scale_cluster import Synthetic


def test_10k_pod_cluster_syncs_with_shipped_defaults(etcd):
    syn = Synthetic(10_000, 500, 1_000)
    records = list(syn.records())

    async def body():
        async with EtcdStore("127.0.0.1", etcd.port) as st:
            for i in range(0, len(records), 4096):
                await st.put_records(records[i:i + 4096])
            _, items = await st.list_prefix()
            size = sum(len(k) + len(v) for k, v in items)
            assert size > 4 * 2**20, size  # one unpaged reply would exceed gRPC's default limit
        events: list = []
        synced = asyncio.Event()

        def emit(ev):
            events.append(ev)
            if isinstance(ev, SyncStatus) and ev.in_sync:
                synced.set()
        syncer = EtcdSyncer(EtcdStore("127.0.0.1", etcd.port))
        task = asyncio.create_task(syncer.run(emit))
        try:
            await asyncio.wait_for(synced.wait(), 120)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert syncer.lists == 1  # one list, no retries
        assert not [e for e in events if isinstance(e, SyncStatus) and not e.in_sync]
        got = {(e.kind, e.key): e.value for e in events if isinstance(e, Update)}
        assert got == {(KIND_OF[type(r)], r.key): r for r in records}
    asyncio.run(asyncio.wait_for(body(), 300))


def test_page_too_big_for_the_receive_limit_is_fetched_in_smaller_pages(etcd):
    # 20 objects of 1.2 MB (etcd takes up to 1.5 MiB a request): 24 MB in one page of
    # LIST_PAGE_KEYS keys is over the 16 MiB receive limit.
    big = b"x" * 1_200_000
    keys = [f"/big/k{i:02d}" for i in range(20)]

    async def body():
        async with EtcdStore("127.0.0.1", etcd.port, prefix="/big") as st:
            for k in keys:
                await st.client.put(k.encode(), big)
            pages = [page async for _, page in st.list_pages()]
        assert 20 <= LIST_PAGE_KEYS
        assert len(pages) > 1
        assert [k for page in pages for k, _ in page] == keys
        assert all(v == big for page in pages for _, v in page)
    asyncio.run(asyncio.wait_for(body(), 120))
