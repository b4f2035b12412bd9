"""The agent's event loop: the one-way pipeline datastore -> Syncer -> model -> pure calc ->
dataplane drivers.

One asyncio loop owns the model.  Syncer events arrive on a queue and are applied in
batches; after each batch (and on the resync timer, which also repairs drift) the calc
computes the whole desired state and the drivers reconcile it on one worker thread, in
the order that keeps references valid (ipsets before the rules that use them, stale ipsets
after).  Events about this node's own endpoints go to the endpoint registry (the agent is
their authority) and the endpoint publisher (the datastore's copies).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from felix_agent import metrics
from felix_agent.agent import heap
from felix_agent.agent.endpoint_publisher import EndpointPublisher
from felix_agent.agent.endpoints import EndpointRegistry
from felix_agent.agent.flows import FlowLog
from felix_agent.agent.health import Health
from felix_agent.agent.ipam_sync import IPAMSync
from felix_agent.agent.registrar import NodeRegistrar
from felix_agent.agent.state import ModelState, Status
from felix_agent.config import AgentConfig
from felix_agent.logs import kv
from felix_agent.model import DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE_V6, IPPool, SyncStatus, Update

log = logging.getLogger("tortie.agent")

# How often the loop checks that BIRD, once started, still runs (seconds; three small
# /proc reads each time).
BIRD_CHECK_INTERVAL = 1.0
# A calc that took less than this last time runs on the event loop; a longer one on the
# dataplane thread with the model held (a thread hop costs ~0.3 ms of every CNI ADD's pass).
INLINE_CALC_SECONDS = 0.005


class AgentLoop:
    def __init__(self, cfg: AgentConfig, dataplane, syncer, state: ModelState, status: Status,
                 endpoints: EndpointRegistry, publisher: EndpointPublisher | None = None):
        """`dataplane` is a felix_agent.dataplane.barrier.Dataplane (drivers + calc glue);
        `syncer` a datastore Syncer; `status` what the loop reports (it keeps it current);
        `publisher` the endpoint publisher (etcd mode)."""
        self.cfg = cfg
        self.node = cfg.name
        self.dataplane = dataplane
        self.syncer = syncer
        self.state = state
        self.endpoints = endpoints
        self.publisher = publisher
        self.ipam: IPAMSync | None = None
        self.registrar: NodeRegistrar | None = None  # etcd mode with register_node
        self.flows: FlowLog | None = None  # flow logs, when on: told each pass's rule ids and names
        self.liveness_timeout = cfg.liveness_timeout or max(60.0, cfg.resync_interval * 6)
        self.health = Health(liveness_timeout=self.liveness_timeout, watchdog=self.stalls)
        self._beat: float | None = None  # the event loop's heartbeat (see _heartbeat)
        self._pass_since: float | None = None  # when the running dataplane pass started
        self._calc_seconds = float("inf")  # the last calc's time: the first pass goes off the loop
        self._jumped = False  # the last pass went ahead of the queued datastore events (run_loop)
        self.heap_settled = False  # heap.settle() ran after the first programmed pass in sync
        self.status = status
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataplane")
        for name, cidr in cfg.default_pools:
            state.inject(Update("IPPool", name, IPPool(
                name=name, cidr=cidr, mode=cfg.default_pool_mode,
                block_size=DEFAULT_BLOCK_SIZE if ":" not in cidr else DEFAULT_BLOCK_SIZE_V6)))

    # -- events -------------------------------------------------------------------------

    def emit(self, event) -> None:
        """Called by the Syncer (from the loop or, via call_soon_threadsafe, a thread)."""
        self.state.queue.put_nowait(event)

    def _handle(self, event) -> None:
        if isinstance(event, SyncStatus):
            self._sync_status(event)
        elif event.kind == "WorkloadEndpoint" and event.key.startswith(self.node + "/"):
            metrics.DATASTORE_EVENTS.labels(kind=event.kind).inc()
            if self.publisher is not None:
                self.publisher.seen(event.key, event.value)
            if self.endpoints.datastore_copy(event.key, event.value) and self.publisher is not None:
                self.publisher.schedule()
        elif event.kind == "WorkloadEndpoint" and event.value is None and self.endpoints.serves(event.key):
            # A datastore deletion of an endpoint this node still serves (e.g. etcd lost it
            # during an outage) must not unprotect a running pod.
            return
        else:
            self.state.inject(event)

    def _sync_status(self, event: SyncStatus) -> None:
        self.status.in_sync = event.in_sync
        self.status.sync_reason = event.reason
        self.health.in_sync = event.in_sync
        metrics.IN_SYNC.set(1 if event.in_sync else 0)
        log.info("datastore sync", extra=kv(in_sync=event.in_sync, reason=event.reason))
        if event.in_sync:
            self.state.synced_once = True
            self.endpoints.synced()
            if self.publisher is not None:
                self.publisher.schedule()  # check what the datastore holds of this node
            self.state.generation += 1  # make sure readiness follows a programmed pass

    # -- liveness -----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Runs on the event loop every second: stale, it says the loop is blocked."""
        self._beat = time.monotonic()
        asyncio.get_running_loop().call_later(1.0, self._heartbeat)

    def stalls(self) -> dict[str, str]:
        """{part: why} for each part stuck although it has work, for /livez (read from the
        HTTP thread): the event loop (no heartbeat), the dataplane worker (one pass running
        for too long), the datastore watcher (no event, probe or reconnect attempt).  The
        agent's loop itself is Health's tick.  A datastore that is down is not a stall: the
        watcher keeps trying, and /readyz says so."""
        now, limit, out = time.monotonic(), self.liveness_timeout, {}
        if self._beat is not None and now - self._beat > limit:
            out["event_loop"] = f"blocked for {now - self._beat:.0f}s"
        since = self._pass_since
        if since is not None and now - since > limit:
            out["dataplane"] = f"one pass has been running for {now - since:.0f}s"
        progress = getattr(self.syncer, "last_progress", None)
        if progress is not None and now - progress > limit:
            out["datastore"] = f"the watcher made no progress for {now - progress:.0f}s"
        return out

    async def run_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        if self._beat is None:
            self._heartbeat()
        next_resync = 0.0
        next_bird_check = 0.0
        while not stop.is_set():
            self.health.tick()
            now = time.monotonic()
            if now >= next_bird_check:
                next_bird_check = now + BIRD_CHECK_INTERVAL
                if self._pass_since is None and self.dataplane.bird_died():
                    self.state.generation += 1  # the next pass, incremental or not, restarts it
            timeout = max(0.0, min(next_resync, next_bird_check) - time.monotonic())
            # A CNI request waits for a pass whose change is in the model already: program it
            # before the datastore events queued meanwhile (a burst of remote changes), which
            # make the next pass; never twice in a row, so the watch is not starved.
            self._jumped = not self._jumped and self.state.waited_for()
            if not self._jumped:
                try:
                    first = await asyncio.wait_for(self.state.queue.get(), timeout=timeout)
                    batch = [first]
                    while not self.state.queue.empty():
                        batch.append(self.state.queue.get_nowait())
                    for ev in batch:
                        if ev is not None:
                            self._handle(ev)
                except asyncio.TimeoutError:
                    pass
            kinds = self.state.take_changed_kinds()
            if self.ipam is not None:
                await self.ipam.follow(self.state.cluster, kinds, self.state.synced_once)
            resync_due = time.monotonic() >= next_resync
            if not self.state.synced_once:
                next_resync = time.monotonic() + 0.5
                continue
            if self.state.generation == self.state.applied_generation and not resync_due:
                continue
            target = self.state.generation
            try:
                # A slow calc runs on the dataplane thread (at 100k pods a node add takes
                # ~0.1 s, the first pass seconds), the model held still meanwhile: CNI
                # requests, watches and probes are served; their changes wait for the next pass.
                self._pass_since = time.monotonic()
                try:
                    if self._calc_seconds < INLINE_CALC_SECONDS:
                        # cheap (small clusters, most passes): the thread hop would cost more
                        plan = self.dataplane.calculate(self.state.cluster, resync_due)
                    else:
                        self.state.hold()
                        try:
                            plan = await loop.run_in_executor(self._pool, self.dataplane.calculate,
                                                              self.state.cluster, resync_due)
                        finally:
                            self.state.release()
                    t0 = time.monotonic()
                    self._calc_seconds = t0 - self._pass_since
                    summary = await loop.run_in_executor(self._pool, self.dataplane.apply, plan, resync_due)
                finally:
                    self._pass_since = None
                took = time.monotonic() - t0
                self.status.last_apply, self.status.last_apply_seconds = time.time(), took
                self.status.applies += 1
                # A pass can succeed with a degraded part (e.g. no ipip module): keep saying so.
                self.status.last_error = "; ".join(getattr(self.dataplane, "problems", {}).values())
                if summary:
                    log.info("dataplane programmed", extra=kv(seconds=f"{took:.3f}", **summary))
                if resync_due:
                    # Full passes keep their own timer: event passes (pods churning every
                    # second) must not postpone the one that repairs drift.
                    next_resync = t0 + self.cfg.resync_interval
            except Exception as e:
                metrics.ERRORS.labels(kind="dataplane").inc()
                self.status.last_error = f"{type(e).__name__}: {e}"
                log.error("dataplane apply failed; retrying", extra=kv(error=self.status.last_error),
                          exc_info=log.isEnabledFor(logging.DEBUG))
                next_resync = time.monotonic() + min(2.0, self.cfg.resync_interval)
                continue
            self.health.programmed = self.status.in_sync
            if self.status.in_sync and not self.heap_settled:
                self.heap_settled = True
                heap.settle()
            problems = getattr(self.dataplane, "problems", {})
            # either family's forwarding off keeps the node from serving pods: /readyz says so
            self.health.faults = {k: problems[k] for k in ("forwarding", "forwarding6") if problems.get(k)}
            if self.flows is not None:
                self.flows.follow(plan.state.flow_rules, self.state.cluster)
            if plan.errors:
                log.warning("calc skipped bad input", extra=kv(errors="; ".join(plan.errors[:5])))
            if self.registrar is not None and self.status.in_sync:
                try:
                    await self.registrar.sync(self.state.cluster.nodes.get(self.node), plan)
                except Exception as e:
                    metrics.ERRORS.labels(kind="datastore").inc()
                    log.warning("could not publish this node's record", extra=kv(error=e))
            await self.state.programmed(target)
            self._update_gauges()

    def _update_gauges(self) -> None:
        # Endpoint, IPAM and BGP gauges are read from /status at scrape time (metrics.py).
        metrics.POLICIES.set(len(self.state.cluster.policies))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
