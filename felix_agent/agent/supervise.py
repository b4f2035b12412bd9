"""Keeps the agent's core tasks (syncer, loop, publisher) running: a task that fails, ends
or is cancelled by something other than shutdown is logged, counted in
tortie_task_restarts_total{task} and started again after a growing pause.  Only a
FatalError ends the agent, with a message saying which task and why."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from felix_agent import metrics
from felix_agent.datastore.base import Backoff
from felix_agent.logs import kv
from felix_agent.tasks import cancelled_from_outside

log = logging.getLogger("tortie.supervise")

# A task that ran this long before failing starts again after the shortest pause.
HEALTHY_RUN = 60.0


class FatalError(Exception):
    """Nothing a restart can fix (e.g. a configuration the datastore rejects for good)."""


async def supervise(name: str, run: Callable[[], Awaitable[None]], stop: asyncio.Event,
                    backoff: Backoff | None = None) -> None:
    """Run `run()` until `stop` is set; returns when it is (or when `run` returns after
    it), raises FatalError from `run`, restarts on anything else."""
    backoff = backoff or Backoff(initial=0.2, maximum=10.0)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            await run()
            if stop.is_set():
                return
            error = "returned while the agent runs"
        except asyncio.CancelledError:
            if cancelled_from_outside():
                raise  # shutdown
            error = "cancelled from inside (not by shutdown)"
        except FatalError:
            raise
        except Exception as e:  # noqa: BLE001 - a core task must come back, whatever broke it
            error = f"{type(e).__name__}: {e}"
        if time.monotonic() - t0 > HEALTHY_RUN:
            backoff.reset()
        pause = backoff.next()
        metrics.TASK_RESTARTS.labels(task=name).inc()
        log.error("core task failed; restarting it", extra=kv(task=name, error=error, pause=f"{pause:.1f}s"))
        try:
            await asyncio.wait_for(stop.wait(), pause)
        except asyncio.TimeoutError:
            pass
