"""The agent's one-way pipeline: datastore -> Syncer -> Cluster (model) -> pure calc ->
dataplane drivers, plus the local API that the CNI binary calls.

One asyncio loop owns the model.  Syncer events arrive on a queue and are applied in
batches; after each batch (and on the resync timer, which also repairs drift) the calc
computes the whole desired state and the drivers reconcile it on one worker thread, in
the order that keeps references valid (ipsets before the rules that use them, stale ipsets
after).  A CNI ADD registers its endpoint here and gets its answer only once a dataplane
pass that includes the endpoint has completed, so no pod runs before its policy.

The agent is the authority on its own node's WorkloadEndpoints: it wired them.  The
datastore's copies are what it has published for other nodes, nothing more, so they never
override what the agent serves.  After every (re)sync and whenever the datastore's copies
drift (an etcd restored from an old backup, a write or delete that failed during an
outage, a crash between wiring and publishing) the agent publishes its endpoints again and
removes the ones it no longer serves.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass

from felix_agent import metrics
from felix_agent.calc.cluster import Cluster
from felix_agent.config import AgentConfig
from felix_agent.agent.health import Health
from felix_agent.logs import kv
from felix_agent.model import IPPool, SyncStatus, Update, WorkloadEndpoint

log = logging.getLogger("tortie.agent")

# run_publisher's pause after a failed pass, doubling up to the max (seconds).
PUBLISH_RETRY_MIN = 0.5
PUBLISH_RETRY_MAX = 10.0
# How long the publisher lets a pending dataplane pass go first (seconds).
PUBLISH_AFTER_PASS_WAIT = 1.0
PUBLISH_AFTER_PASS_DELAY = 0.002
# How often the loop checks that BIRD, once started, still runs (seconds; three small
# /proc reads each time).
BIRD_CHECK_INTERVAL = 1.0


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


class Agent:
    def __init__(self, cfg: AgentConfig, dataplane, syncer, store=None, ipam=None):
        """`dataplane` is a felix_agent.dataplane.barrier.Dataplane (drivers + calc glue);
        `syncer` a datastore Syncer; `store` the etcd store for writes (None in kubernetes
        mode); `ipam` the node's IPAM."""
        self.cfg = cfg
        self.node = cfg.name
        self.cluster = Cluster()
        self.dataplane = dataplane
        self.syncer = syncer
        self.store = store
        self.ipam = ipam
        self.liveness_timeout = cfg.liveness_timeout or max(60.0, cfg.resync_interval * 6)
        self.health = Health(liveness_timeout=self.liveness_timeout, watchdog=self.stalls)
        self._beat: float | None = None  # the event loop's heartbeat (see _heartbeat)
        self._pass_since: float | None = None  # when the running dataplane pass started
        self.status = Status(node=self.node, datastore=cfg.datastore)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.generation = 0  # bumped on every model change
        self.applied_generation = -1
        self._applied = asyncio.Condition()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataplane")
        self._local_weps: dict[str, WorkloadEndpoint] = {}
        # This node's endpoints as the datastore holds them (its own watch events), and
        # whether that differs from _local_weps in a way _publish_endpoints must repair.
        self._ds_weps: dict[str, WorkloadEndpoint] = {}
        self._publish_due = False
        self._publish_wake = asyncio.Event()  # run_publisher's
        # Host veths found at start-up (see set_startup_ifaces), until the first sync; and
        # endpoints deleted before it, which must not be adopted from a stale copy.
        self._startup_ifaces: set[str] | None = None
        self._gone_before_sync: set[str] = set()
        self._changed_kinds: set[str] = set()
        self.node_ip = ""
        self.registrar = None  # main.NodeRegistrar in etcd mode
        self._pod_cidr_backend = None
        # Nothing is written to the kernel before the first complete sync: a restarted
        # agent with a half-known model would otherwise tear down live pods' chains.
        self._synced_once = False
        if hasattr(syncer, "on_bad_record"):
            syncer.on_bad_record = self._bad_record_seen
        if cfg.default_pool:
            self._inject(Update("IPPool", "default-pool", IPPool(
                name="default-pool", cidr=cfg.default_pool, mode=cfg.default_pool_mode)))

    # -- events -------------------------------------------------------------------------

    def emit(self, event) -> None:
        """Called by the Syncer (from the loop or, via call_soon_threadsafe, a thread)."""
        self.queue.put_nowait(event)

    def _inject(self, update: Update) -> None:
        if update.kind == "WorkloadEndpoint" and update.value is None and update.key in self._local_weps:
            # A datastore deletion of an endpoint this node still serves (e.g. etcd lost it
            # during an outage) must not unprotect a running pod.
            return
        changed = self.cluster.apply(update)
        if changed:
            self.generation += 1
            self._changed_kinds |= changed
        metrics.DATASTORE_EVENTS.labels(kind=update.kind).inc()

    def _handle(self, event) -> None:
        if isinstance(event, SyncStatus):
            self.status.in_sync = event.in_sync
            self.status.sync_reason = event.reason
            self.health.in_sync = event.in_sync
            metrics.IN_SYNC.set(1 if event.in_sync else 0)
            log.info("datastore sync", extra=kv(in_sync=event.in_sync, reason=event.reason))
            if event.in_sync:
                self._synced_once = True
                self._startup_ifaces = None  # the first list is in: adoption is over
                self._gone_before_sync.clear()
                self._schedule_publish()  # check what the datastore holds of this node
                self.generation += 1  # make sure readiness follows a programmed pass
        elif event.kind == "WorkloadEndpoint" and event.key.startswith(self.node + "/"):
            self._own_endpoint_event(event)
        else:
            self._inject(event)

    def _own_endpoint_event(self, update: Update) -> None:
        """The datastore's copy of one of this node's endpoints changed."""
        key, value = update.key, update.value
        if value is None:
            self._ds_weps.pop(key, None)
        else:
            self._ds_weps[key] = value
        metrics.DATASTORE_EVENTS.labels(kind=update.kind).inc()
        local = self._local_weps.get(key)
        if (local is None and value is not None and self._startup_ifaces is not None
                and value.iface in self._startup_ifaces and key not in self._gone_before_sync):
            # Wired before a restart through a non-tortie IPAM plugin (no allocation here to
            # restore it from): its veth is still up, so this node still serves it.
            log.info("adopted endpoint from the datastore", extra=kv(key=key, iface=value.iface))
            self.adopt(value)
            return
        if local is None:
            # Not served here: left over from a DEL that could not reach the datastore or
            # from a crash.  It is not wired, so it stays out of the model, and the
            # publisher removes it from the datastore.
            if value is not None:
                self._schedule_publish()
            return
        if value == local:
            return
        if (value is not None and not local.mac and value.container_id == local.container_id
                and value.iface == local.iface and value.ips == local.ips):
            # An endpoint adopted at start-up knows no MAC; the published copy does.
            self._local_weps[key] = value
            self._inject(Update("WorkloadEndpoint", key, value))
            return
        self._schedule_publish()  # the datastore lost or garbled it: publish ours again

    def _bad_record_seen(self, key: str) -> None:
        """The syncer found a key that holds no valid record; one under this node's own
        endpoints is ours to remove (the publisher does it)."""
        if self.store is not None and key.startswith(self._own_wep_prefix()):
            self._schedule_publish()

    def _own_wep_prefix(self) -> str:
        return f"{self.store.prefix}/workloadendpoints/{self.node}/"

    def bad_records(self) -> dict[str, str]:
        """key -> why, for every datastore key the syncer could not decode."""
        return {k: why for k, (why, _) in list(getattr(self.syncer, "bad_records", {}).items())}

    # -- IPAM ---------------------------------------------------------------------------

    def attach_ipam(self, ipam, pod_cidr_backend=None) -> None:
        """`pod_cidr_backend` (kubernetes mode) gets this node's Node.spec.podCIDRs."""
        self.ipam = ipam
        self._pod_cidr_backend = pod_cidr_backend
        ipam.set_pools(self.cluster.pools.values())

    async def _sync_ipam(self, kinds: set[str]) -> None:
        if self.ipam is None or not kinds & {"IPPool", "BlockAffinity", "Node"}:
            return
        self.ipam.set_pools(self.cluster.pools.values())
        me = self.cluster.nodes.get(self.node)
        if self._pod_cidr_backend is not None and me is not None:
            self._pod_cidr_backend.set_pod_cidrs(me.pod_cidrs)
        # Once synced, the model holds every claim and the watch keeps it current: no read
        # of all claims from etcd per Node or block event (5,000 nodes: ~70 ms each).
        claims = (self.cluster.block_affinities.values()
                  if self._synced_once and getattr(getattr(self.ipam, "backend", None), "claims_blocks", False)
                  else None)
        try:
            await self.ipam.refresh(claims)
        except Exception as e:  # the datastore may be down: IPAM keeps what it knows
            log.warning("IPAM refresh failed", extra=kv(error=e))

    # -- endpoint registry (the local API's view) -------------------------------------

    def adopt(self, wep: WorkloadEndpoint) -> None:
        """An endpoint found at start-up (persisted allocation with its veth present)."""
        self._local_weps[wep.key] = wep
        self._inject(Update("WorkloadEndpoint", wep.key, wep))

    def set_startup_ifaces(self, names: set[str]) -> None:
        """The host veths present at start-up: until the first sync, this node's endpoints
        in the datastore whose veth is among them are adopted."""
        self._startup_ifaces = set(names)

    async def register(self, wep: WorkloadEndpoint) -> None:
        """Record a local endpoint and return once its policy is programmed.

        Publishing the endpoint to the datastore is the publisher task's job
        (run_publisher), not the ADD's: the etcd write (2-3 ms here, an fsync on the etcd
        side) would otherwise be on every ADD's path, and other nodes learn of the pod
        through their watches after the write whenever it lands.  Order that must hold:
        the pod's labels are learnt before the endpoint enters the model (the pass
        programs the right policy).  One exception: an agent that has never synced writes
        at once and fails the ADD if the datastore is unreachable, since it has no policy
        to program the pod with and that pass would never come."""
        t0 = time.monotonic()
        await self._learn_pod(wep.namespace, wep.pod)
        t_learn = time.monotonic()
        self._local_weps[wep.key] = wep
        self._inject(Update("WorkloadEndpoint", wep.key, wep))
        target = self.generation
        self.queue.put_nowait(None)  # wake the loop
        if self.store is not None:
            if self._synced_once:
                self._schedule_publish()
            else:
                await self.store.put_record(wep)
                self._ds_weps[wep.key] = wep
        await self.wait_programmed(target)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("endpoint registered", extra=kv(
                key=wep.key, learn_ms=f"{(t_learn - t0) * 1000:.1f}",
                wait_ms=f"{(time.monotonic() - t_learn) * 1000:.1f}"))

    async def _learn_pod(self, namespace: str, pod: str) -> None:
        """The pod's labels decide which policies select it; if its Pod record has not
        reached us through the watch yet, read it now, so the chains programmed before the
        ADD answers are the right ones (Calico's CNI plugin reads the pod for the same
        reason).  Without a readable datastore the watch delivers it later."""
        if self.store is None or not namespace or f"{namespace}/{pod}" in self.cluster.pods:
            return
        try:
            record = await self.store.get("Pod", pod, namespace)
        except (ConnectionError, OSError) as e:
            log.debug("pod not readable at ADD", extra=kv(pod=f"{namespace}/{pod}", error=e))
            return
        if record is not None:
            self._inject(Update("Pod", record.key, record))

    async def unregister(self, namespace: str, pod: str) -> None:
        """Take a local endpoint out of the model; the publisher deletes its datastore copy."""
        key = f"{self.node}/{namespace}/{pod}"
        self._local_weps.pop(key, None)
        if self._startup_ifaces is not None:
            self._gone_before_sync.add(key)
        self._inject(Update("WorkloadEndpoint", key, None))
        self.queue.put_nowait(None)
        if self.store is not None:
            self._schedule_publish()

    # -- the publisher ------------------------------------------------------------------

    def _schedule_publish(self) -> None:
        self._publish_due = True
        self._publish_wake.set()

    async def run_publisher(self) -> None:
        """Make the datastore's copies of this node's endpoints follow what it serves, on
        its own task: ADDs and DELs do not wait for etcd, and being one task, a write of
        one key never overtakes an earlier one.  Waits while the datastore is out of sync
        (the next sync schedules a pass); a failed pass is retried with a growing pause."""
        pause = PUBLISH_RETRY_MIN
        while True:
            await self._publish_wake.wait()
            self._publish_wake.clear()
            if not (self._publish_due and self.store is not None and self.status.in_sync):
                continue
            # The pass that wires the change comes first: a pod waits for it, nobody waits
            # for the write, and both need this process (the write's gRPC work and the
            # pass's netlink calls slow each other down by ~1 ms when they overlap).
            if self.applied_generation < self.generation:
                try:
                    await self.wait_programmed(self.generation, timeout=PUBLISH_AFTER_PASS_WAIT)
                except asyncio.TimeoutError:
                    pass  # a slow or failing dataplane must not hold the datastore back
                await asyncio.sleep(PUBLISH_AFTER_PASS_DELAY)  # and the ADD's answer goes out
            await self._publish_endpoints()
            if not self._publish_due:
                pause = PUBLISH_RETRY_MIN
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, PUBLISH_RETRY_MAX)
            self._publish_wake.set()

    async def _publish_endpoints(self) -> None:
        """Make the datastore's copies of this node's endpoints equal what it serves.
        Deletions go first: an address released by a DEL and handed to a new pod must not
        appear in two published endpoints (two label sets) at once."""
        from felix_agent.datastore.etcd import encode_record, record_key

        self._publish_due = False
        try:
            own = self._own_wep_prefix()
            for key, (why, raw) in list(getattr(self.syncer, "bad_records", {}).items()):
                if key.startswith(own):
                    # Garbage under this node's own endpoints (only this agent writes
                    # there): compare-and-delete, so a valid write meanwhile stays.
                    await self.store.delete_if_value(key, raw)
                    log.warning("removed a malformed endpoint record of this node", extra=kv(key=key, why=why))
            for key, old in list(self._ds_weps.items()):
                if key in self._local_weps:
                    continue
                # Compare-and-delete: an ADD that registers this key meanwhile wins.
                etcd_key = record_key(self.store.prefix, old)
                if not await self.store.delete_if_value(etcd_key, encode_record(old)):
                    raw = await self.store.get_value(etcd_key)
                    if raw is not None and key not in self._local_weps:
                        await self.store.delete_if_value(etcd_key, raw)
                self._ds_weps.pop(key, None)
                log.info("removed endpoint this node no longer serves", extra=kv(key=key))
            for key, wep in list(self._local_weps.items()):
                if self._ds_weps.get(key) != wep:
                    await self.store.put_record(wep)
                    self._ds_weps[key] = wep  # the watch echoes the same value
                    log.debug("published endpoint", extra=kv(key=key, ips=",".join(wep.ips)))
        except Exception as e:
            self._publish_due = True  # retried by run_publisher
            metrics.ERRORS.labels(kind="datastore").inc()
            log.warning("could not publish this node's endpoints", extra=kv(error=e))

    async def wait_programmed(self, generation: int, timeout: float = 30.0) -> None:
        async with self._applied:
            await asyncio.wait_for(
                self._applied.wait_for(lambda: self.applied_generation >= generation), timeout)

    # -- the loop -----------------------------------------------------------------------

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
                    self.generation += 1  # the next pass, incremental or not, restarts it
            timeout = max(0.0, min(next_resync, next_bird_check) - time.monotonic())
            try:
                first = await asyncio.wait_for(self.queue.get(), timeout=timeout)
                batch = [first]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                for ev in batch:
                    if ev is not None:
                        self._handle(ev)
            except asyncio.TimeoutError:
                pass
            kinds, self._changed_kinds = self._changed_kinds, set()
            await self._sync_ipam(kinds)
            resync_due = time.monotonic() >= next_resync
            if not self._synced_once:
                next_resync = time.monotonic() + 0.5
                continue
            if self.generation == self.applied_generation and not resync_due:
                continue
            target = self.generation
            try:
                plan = self.dataplane.calculate(self.cluster, full=resync_due)
                t0 = self._pass_since = time.monotonic()
                try:
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
            fwd = getattr(self.dataplane, "problems", {}).get("forwarding")
            self.health.faults = {"forwarding": fwd} if fwd else {}
            if plan.errors:
                log.warning("calc skipped bad input", extra=kv(errors="; ".join(plan.errors[:5])))
            if self.registrar is not None and self.status.in_sync:
                try:
                    await self.registrar.sync(self, plan)
                except Exception as e:
                    metrics.ERRORS.labels(kind="datastore").inc()
                    log.warning("could not publish this node's record", extra=kv(error=e))
            async with self._applied:
                self.applied_generation = target
                self._applied.notify_all()
            self._update_gauges()

    def _update_gauges(self) -> None:
        # Endpoint, IPAM and BGP gauges are read from /status at scrape time (metrics.py).
        metrics.POLICIES.set(len(self.cluster.policies))

    def status_dict(self) -> dict:
        """What `tortiectl status` shows (served at /status; called from the HTTP thread)."""
        st = self.status
        bgp = self.dataplane.bgp_status()
        bad = self.bad_records()
        bad_text = ""
        if bad:
            key, why = sorted(bad.items())[0]
            bad_text = f"datastore: {len(bad)} record(s) could not be decoded, e.g. {key}: {why}"
        ipam = (self.ipam.show({w.container_id for w in list(self._local_weps.values())})
                if self.ipam is not None else None)
        return {
            "node": self.node, "node_ip": self.node_ip, "datastore": st.datastore,
            "in_sync": st.in_sync, "sync_reason": st.sync_reason, "ready": self.health.ready,
            "iptables_backend": self.dataplane.backend, "routing_modes": list(self.dataplane.modes),
            "last_apply": st.last_apply, "last_apply_seconds": round(st.last_apply_seconds, 4),
            "applies": st.applies, "last_error": "; ".join(e for e in (st.last_error, bad_text) if e),
            "bad_records": [{"key": k, "why": why} for k, why in sorted(bad.items())],
            "endpoints": [{"namespace": w.namespace, "pod": w.pod, "iface": w.iface, "ips": list(w.ips),
                           "container_id": w.container_id} for w in sorted(self._local_weps.values(),
                                                                            key=lambda w: w.key)],
            "bgp_peers": [p for p in bgp if p.get("proto") == "BGP"],
            "ipam": None if ipam is None else {
                "blocks": [{"cidr": b.cidr, "pool": b.pool, "used": b.used, "capacity": b.capacity}
                           for b in ipam.blocks],
                "allocations": len(ipam.allocations), "leaks": len(ipam.leaks),
                "allocation_list": [{"ip": a.ip, "container_id": a.container_id, "namespace": a.namespace,
                                     "pod": a.pod, "leak": a in ipam.leaks} for a in ipam.allocations]},
        }

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
