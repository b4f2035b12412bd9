"""The agent's core-task supervisor: a failing, ending or inwardly cancelled task is
restarted (and counted), shutdown ends it, a FatalError ends the agent."""
from __future__ import annotations

import asyncio

import pytest

from felix_agent import metrics
from felix_agent.datastore.base import Backoff
from felix_agent.agent.supervise import FatalError, supervise


def restarts(task: str) -> float:
    return metrics.REGISTRY.get_sample_value("tortie_task_restarts_total", {"task": task}) or 0.0


def test_failures_and_inner_cancellation_are_restarted_and_counted(caplog):
    runs = []

    async def flaky():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        if len(runs) == 2:
            raise asyncio.CancelledError()  # what grpc.aio raises when a channel closes
        if len(runs) == 3:
            return  # a core task that just ends is a failure too
        await asyncio.sleep(3600)

    async def main():
        stop = asyncio.Event()
        t = asyncio.create_task(supervise("t-flaky", flaky, stop, Backoff(initial=0.01, maximum=0.02)))
        for _ in range(200):
            if len(runs) >= 4:
                break
            await asyncio.sleep(0.01)
        assert not t.done()
        stop.set()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    before = restarts("t-flaky")
    asyncio.run(main())
    assert len(runs) == 4
    assert restarts("t-flaky") - before == 3
    assert "core task failed; restarting it" in caplog.text
    assert any("boom" in str(getattr(r, "kv", {}).get("error")) for r in caplog.records)


def test_stop_ends_it_and_fatal_error_propagates():
    async def until_stop(stop):
        await stop.wait()

    async def fatal():
        raise FatalError("bad for good")

    async def main():
        stop = asyncio.Event()
        t = asyncio.create_task(supervise("t-stop", lambda: until_stop(stop), stop))
        await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(t, 1)
        with pytest.raises(FatalError, match="bad for good"):
            await supervise("t-fatal", fatal, asyncio.Event())

    asyncio.run(main())
