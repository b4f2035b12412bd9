"""Deleting the veths of deleted pods, off the DEL path.

The kernel needs 16-48 ms to destroy one veth (it waits for RCU grace periods before the
netlink call returns), more than Debian's whole ptp DEL.  So the agent's DEL only
*retires* the host veth (podnet.plumbing.retire: one netlink message takes it down,
which cuts the pod off and drops its IPv4 host route at once, renames it out of the cali
namespace so a new sandbox of the same pod can have the name straight away, and moves it
into our link group) and answers.  This reaper then deletes every retired veth of the node
with one netlink request per batch: the kernel unregisters a whole link group in one go
(10 veths in ~50 ms, against 16-48 ms each one by one), so a burst of DELs costs about one
deletion, not one each.

A crash between retiring and reaping leaves retired links down and nameless to Kubernetes;
the agent reaps them when it starts.  The runtime removing the pod's netns destroys the
pair anyway.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Callable

from felix_agent.logs import kv

log = logging.getLogger("tortie.retired")

# Retirements that arrive within this window share one deletion (a kubelet tearing down a
# node's pods sends its DELs within milliseconds of each other).
BATCH_WINDOW = 0.02


class RetiredLinkReaper:
    """Runs `reap` (podnet.plumbing.reap_retired: delete every retired link, return how
    many) on `executor` soon after `notify()`, one run at a time; retirements made during a
    run get another run right after it."""

    def __init__(self, reap: Callable[[], int], executor: concurrent.futures.Executor,
                 window: float = BATCH_WINDOW):
        self._reap = reap
        self._executor = executor
        self._window = window
        self._task: asyncio.Task | None = None
        self._again = False
        self.reaped = 0  # links deleted since start, for status and tests

    def notify(self) -> None:
        """A link was retired: make sure a run starts (on the running loop)."""
        self._again = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(self._window), name="reaper")

    async def flush(self) -> None:
        """Delete everything retired so far and return once it is gone (start-up, shutdown)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._again = True
        await self._run(0.0)

    async def _run(self, window: float) -> None:
        if window:
            await asyncio.sleep(window)
        loop = asyncio.get_running_loop()
        while self._again:
            self._again = False
            t0 = time.monotonic()
            try:
                n = await loop.run_in_executor(self._executor, self._reap)
            except Exception as e:  # noqa: BLE001 - retired links are down and harmless; next DEL retries
                log.warning("could not delete retired links", extra=kv(error=e))
                return
            self.reaped += n
            if n:
                log.debug("deleted retired links", extra=kv(count=n, ms=f"{(time.monotonic() - t0) * 1000:.1f}"))
