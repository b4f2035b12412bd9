"""etcd going away under load: one EtcdStore shared by a Syncer and many concurrent
readers (as the agent's ADD path, publisher and IPAM share it) while a real etcd on
loopback is frozen (SIGSTOP: calls hang until their deadline), killed with -9 and
restarted.  No netns, no root: etcd listens on 127.0.0.1.

What must hold: no call ever cancels another's (a reader sees only EtcdUnavailable, never
CancelledError), the syncer never ends, and after etcd is back it resyncs and delivers a
change made afterwards."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from felix_agent.datastore.etcd import EtcdUnavailable
from felix_agent.model import Namespace, Update
from tests.lab.etcd import Etcd
from tests.lab.etcd_syncer import synced_syncer

READERS = 16


def _kill9(e: Etcd) -> None:
    os.killpg(e.proc.pid, signal.SIGKILL)
    e.proc.wait()
    e.proc = None


async def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _scenario(e: Etcd) -> None:
    store, _, events, sync_task = await synced_syncer(e.port, "/faults", timeout=1.0)

    outcomes = {"ok": 0, "unavailable": 0}
    unexpected: list[BaseException] = []
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            try:
                await store.get("Namespace", "before")
                outcomes["ok"] += 1
            except EtcdUnavailable:
                outcomes["unavailable"] += 1
                await asyncio.sleep(0.02)
            except BaseException as ex:  # CancelledError included: that is the fault
                unexpected.append(ex)
                raise

    readers = [asyncio.create_task(reader(), name=f"reader{i}") for i in range(READERS)]
    try:
        await asyncio.sleep(0.5)
        # Frozen etcd: every reader's call hangs until its deadline; the first to give up
        # used to close the channel under all the others (and under the syncer's watch).
        for _ in range(3):
            os.killpg(e.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(2.5)
            os.killpg(e.proc.pid, signal.SIGCONT)
            await asyncio.sleep(1.0)
        _kill9(e)
        await asyncio.sleep(2.0)
        e.start()
        await asyncio.sleep(1.0)
        assert not unexpected, f"readers got {unexpected[:3]!r} instead of EtcdUnavailable"
        assert not sync_task.done(), f"the syncer ended: {sync_task.exception() if not sync_task.cancelled() else 'cancelled'}"
        assert outcomes["unavailable"] > 0, "the outage was not seen: the test did not test anything"

        # Back in service: a change made now reaches the syncer, and readers read again.
        writer = store.clone()
        deadline = time.monotonic() + 20
        while True:
            try:
                await writer.put_record(Namespace(name="after"))
                break
            except EtcdUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await writer.close()
        await _wait(lambda: any(isinstance(ev, Update) and ev.key == "after" for ev in events), 20,
                    "the syncer to deliver a change made after etcd came back")
        ok_before = outcomes["ok"]
        await _wait(lambda: outcomes["ok"] > ok_before, 10, "readers to read again")
        assert not sync_task.done()
        assert all(not r.done() for r in readers), "a reader task ended"
        assert not unexpected, f"readers got {unexpected[:3]!r}"
    finally:
        stop.set()
        sync_task.cancel()
        await asyncio.gather(sync_task, *readers, return_exceptions=True)
        await store.close()


@pytest.mark.timeout(120)
def test_shared_store_survives_frozen_and_killed_etcd():
    with Etcd() as e:
        asyncio.run(_scenario(e))
