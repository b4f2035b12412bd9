"""The state the agent's parts share.

ModelState: the agent's model of the cluster, its generation (bumped on every change) and
how far the dataplane has caught up with it; and the loop's inbox, where syncer events
and wake-ups arrive.  The loop applies and programs it; the endpoint registry injects this
node's endpoints and waits for their pass.

Status: what the loop reports of the datastore sync and the dataplane passes (read by
the status view, the publishers and /readyz).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from felix_agent import metrics
from felix_agent.calc.cluster import Cluster
from felix_agent.model import Update


@dataclass
class Status:
    """What `tortiectl status` and /readyz report."""

    node: str = ""
    datastore: str = ""
    in_sync: bool = False
    sync_reason: str = ""
    iptables_backend: str = ""
    routing_modes: tuple[str, ...] = ()
    last_apply: float = 0.0
    last_apply_seconds: float = 0.0
    last_error: str = ""
    applies: int = 0


class ModelState:
    def __init__(self) -> None:
        self.cluster = Cluster()
        self.queue: asyncio.Queue = asyncio.Queue()  # syncer events; None only wakes the loop
        self.generation = 0  # bumped on every model change
        self.applied_generation = -1
        self.changed_kinds: set[str] = set()  # since the loop last looked (IPAM follows some)
        # Nothing is written to the kernel before the first complete sync: a restarted
        # agent with a half-known model would otherwise tear down live pods' chains.
        self.synced_once = False
        self._applied = asyncio.Condition()
        # While the calc reads the model on the dataplane thread, changes wait here (in
        # order) instead of mutating it under the calc's feet; see hold()/release().
        self._held: list[Update] | None = None
        self._waiters = 0  # wait_programmed() calls in progress (CNI requests waiting for their pass)

    def inject(self, update: Update) -> None:
        metrics.DATASTORE_EVENTS.labels(kind=update.kind).inc()
        if self._held is not None:
            self._held.append(update)
            self.generation += 1  # may turn out to change nothing: one pass too many at worst
            return
        self._apply(update)

    def _apply(self, update: Update) -> None:
        changed = self.cluster.apply(update)
        if changed:
            self.generation += 1
            self.changed_kinds |= changed

    def hold(self) -> None:
        """From now until release(), changes are queued, not applied: another thread reads
        the model (the calc, off the event loop, so CNI requests and watches go on)."""
        self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for update in held:
            self._apply(update)

    def wake(self) -> None:
        """Have the loop look at the model now (a change that came from elsewhere than the
        syncer)."""
        self.queue.put_nowait(None)

    def take_changed_kinds(self) -> set[str]:
        kinds, self.changed_kinds = self.changed_kinds, set()
        return kinds

    async def wait_programmed(self, generation: int, timeout: float = 30.0) -> None:
        self._waiters += 1
        try:
            async with self._applied:
                await asyncio.wait_for(
                    self._applied.wait_for(lambda: self.applied_generation >= generation), timeout)
        finally:
            self._waiters -= 1

    def waited_for(self) -> bool:
        """Someone (a CNI request) waits for a pass and the model has changes not programmed
        yet: the loop programs them before taking in more datastore events."""
        return self._waiters > 0 and self.generation != self.applied_generation

    async def programmed(self, generation: int) -> None:
        """A dataplane pass that includes `generation` has completed."""
        async with self._applied:
            self.applied_generation = generation
            self._applied.notify_all()
