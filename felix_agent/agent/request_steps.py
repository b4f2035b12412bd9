"""Step timings of the CNI request being served, e.g. `alloc=1.9ms plumbing=6.3ms`: the
local API server starts a request's record and logs it; the CNI service times its steps
into it.  Each connection is its own task with its own context, so concurrent requests
never mix their figures."""
from __future__ import annotations

import contextvars
import time

_steps: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("cni_steps", default=None)


def begin_steps() -> dict[str, float]:
    """A new record for the request the current task serves (ms per step name)."""
    steps: dict[str, float] = {}
    _steps.set(steps)
    return steps


def record_step(name: str, since: float) -> None:
    """Add the time from `since` (time.monotonic()) to now to the request's step `name`."""
    d = _steps.get()
    if d is not None:
        d[name] = d.get(name, 0.0) + (time.monotonic() - since) * 1000


class step:
    """`with step("alloc"):` adds the block's wall time to the current request's timings."""

    __slots__ = ("name", "t0")

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc) -> None:
        record_step(self.name, self.t0)


def steps_text(d: dict[str, float] | None) -> str:
    return f" ({' '.join(f'{k}={v:.1f}ms' for k, v in d.items())})" if d else ""
