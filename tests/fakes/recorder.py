"""Runs a Syncer in the test's event loop and records what it emits, so tests can wait for
a condition on the event stream instead of sleeping."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from felix_agent.model import Event, SyncStatus, Update


class Recorder:
    """The `emit` callback: keeps every event and the state they add up to."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.state: dict[tuple[str, str], object] = {}
        self._changed = asyncio.Event()

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, Update):
            if ev.value is None:
                self.state.pop((ev.kind, ev.key), None)
            else:
                self.state[(ev.kind, ev.key)] = ev.value
        self._changed.set()

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> list[Event]:
        return self.events[mark:]

    def updates_since(self, mark: int) -> list[Update]:
        return [e for e in self.events[mark:] if isinstance(e, Update)]

    def statuses_since(self, mark: int) -> list[SyncStatus]:
        return [e for e in self.events[mark:] if isinstance(e, SyncStatus)]

    def keys(self, kind: str) -> set[str]:
        return {k for (kd, k) in self.state if kd == kind}

    async def wait(self, pred: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
        """Wait until pred() holds (checked after every event); a test failure otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what or pred}; events: "
                                     f"{self.events[-10:]}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_in_sync(self, mark: int = 0, timeout: float = 30) -> None:
        await self.wait(lambda: any(s.in_sync for s in self.statuses_since(mark)), timeout,
                        "SyncStatus(True)")

    async def settle(self, quiet: float = 0.5) -> None:
        """Let a running syncer deliver anything still in flight (used before asserting
        that something did NOT happen)."""
        n = -1
        while n != len(self.events):
            n = len(self.events)
            await asyncio.sleep(quiet)


@contextlib.asynccontextmanager
async def running(syncer):
    """`async with running(syncer) as rec:` runs syncer.run(rec) in a task, cancelled on exit."""
    rec = Recorder()
    task = asyncio.create_task(syncer.run(rec))
    try:
        yield rec
        if task.done():  # run() must never return or crash on its own
            task.result()
            raise AssertionError("syncer.run returned")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
