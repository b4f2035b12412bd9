"""asyncio task helpers shared by the datastore and the agent."""
from __future__ import annotations

import asyncio


def cancelled_from_outside() -> bool:
    """True when the current task itself is being cancelled (shutdown, a timeout around
    the caller), as opposed to a CancelledError raised from below (gRPC raises one in
    every call of a channel that closes)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
