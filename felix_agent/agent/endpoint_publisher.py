"""EndpointPublisher: makes the datastore's copies of this node's endpoints follow what the
node serves (etcd mode), on a task of its own.

ADDs and DELs do not wait for etcd, and being one task, a write of one key never
overtakes an earlier one.  After every (re)sync and whenever the datastore's copies drift
(an etcd restored from an old backup, a write or delete that failed during an outage, a
crash between wiring and publishing) it publishes the node's endpoints again and removes
the ones the node no longer serves.  The writes themselves are the datastore Publisher's.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from felix_agent import metrics
from felix_agent.agent.state import ModelState, Status
from felix_agent.datastore.publisher import Publisher
from felix_agent.logs import kv
from felix_agent.model import WorkloadEndpoint

log = logging.getLogger("tortie.agent")

# run's pause after a failed pass, doubling up to the max (seconds).
PUBLISH_RETRY_MIN = 0.5
PUBLISH_RETRY_MAX = 10.0
# How long the publisher lets a pending dataplane pass go first (seconds).
PUBLISH_AFTER_PASS_WAIT = 1.0
PUBLISH_AFTER_PASS_DELAY = 0.002


class EndpointPublisher:
    def __init__(self, writer: Publisher, node: str, state: ModelState, status: Status,
                 served: Mapping[str, WorkloadEndpoint], syncer=None):
        """`served` is the endpoint registry's map of what this node serves; `syncer` the
        datastore syncer, whose bad_records name keys that hold no valid record."""
        self.writer = writer
        self.node = node
        self.state = state
        self.status = status
        self.served = served
        self.syncer = syncer
        # This node's endpoints as the datastore holds them (its own watch events), and
        # whether that differs from `served` in a way a pass must repair.
        self.copies: dict[str, WorkloadEndpoint] = {}
        self.due = False
        self._wake = asyncio.Event()

    def seen(self, key: str, value: WorkloadEndpoint | None) -> None:
        """The watch delivered the datastore's copy of one of this node's endpoints."""
        if value is None:
            self.copies.pop(key, None)
        else:
            self.copies[key] = value

    def schedule(self) -> None:
        self.due = True
        self._wake.set()

    def bad_record_seen(self, key: str) -> None:
        """The syncer found a key that holds no valid record; one under this node's own
        endpoints is ours to remove."""
        if key.startswith(self.writer.own_endpoints_prefix(self.node)):
            self.schedule()

    async def publish_now(self, wep: WorkloadEndpoint) -> None:
        """Write one endpoint at once (an ADD before the first sync; raises when the
        datastore is unreachable)."""
        await self.writer.put_endpoint(wep)
        self.copies[wep.key] = wep

    async def run(self) -> None:
        """Waits while the datastore is out of sync (the next sync schedules a pass); a
        failed pass is retried with a growing pause."""
        pause = PUBLISH_RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not (self.due and self.status.in_sync):
                continue
            # The pass that wires the change comes first: a pod waits for it, nobody waits
            # for the write, and both need this process (the write's gRPC work and the
            # pass's netlink calls slow each other down by ~1 ms when they overlap).
            if self.state.applied_generation < self.state.generation:
                try:
                    await self.state.wait_programmed(self.state.generation, timeout=PUBLISH_AFTER_PASS_WAIT)
                except asyncio.TimeoutError:
                    pass  # a slow or failing dataplane must not hold the datastore back
                await asyncio.sleep(PUBLISH_AFTER_PASS_DELAY)  # and the ADD's answer goes out
            await self._publish()
            if not self.due:
                pause = PUBLISH_RETRY_MIN
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, PUBLISH_RETRY_MAX)
            self._wake.set()

    async def _publish(self) -> None:
        """Make the datastore's copies of this node's endpoints equal what it serves.
        Deletions go first: an address released by a DEL and handed to a new pod must not
        appear in two published endpoints (two label sets) at once."""
        self.due = False
        try:
            own = self.writer.own_endpoints_prefix(self.node)
            for key, (why, raw) in list(getattr(self.syncer, "bad_records", {}).items()):
                if key.startswith(own):
                    # Garbage under this node's own endpoints (only this agent writes
                    # there): compare-and-delete, so a valid write meanwhile stays.
                    await self.writer.remove_malformed(key, raw)
                    log.warning("removed a malformed endpoint record of this node", extra=kv(key=key, why=why))
            for key, old in list(self.copies.items()):
                if key in self.served:
                    continue
                await self.writer.remove_endpoint(old, still_served=lambda key=key: key in self.served)
                self.copies.pop(key, None)
                log.info("removed endpoint this node no longer serves", extra=kv(key=key))
            for key, wep in list(self.served.items()):
                if self.copies.get(key) != wep:
                    await self.writer.put_endpoint(wep)
                    self.copies[key] = wep  # the watch echoes the same value
                    log.debug("published endpoint", extra=kv(key=key, ips=",".join(wep.ips)))
        except Exception as e:
            self.due = True  # retried by run
            metrics.ERRORS.labels(kind="datastore").inc()
            log.warning("could not publish this node's endpoints", extra=kv(error=e))
