"""EtcdSyncer: the Syncer (base.py) for etcd: list the prefix, emit, watch from the list
revision + 1, and on any connection loss reconnect and relist, emitting only the
difference.  A watch that starts from a compacted revision also relists; a probe notices a
watch stream that died without a word."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import aetcd
from aetcd import exceptions as etcd_errors

from felix_agent import metrics
from felix_agent.datastore import keys
from felix_agent.datastore.base import Backoff, Emit, EmittedState, RecordId
from felix_agent.datastore.etcd.records import decode_checked
from felix_agent.datastore.etcd.store import EtcdStore, EtcdUnavailable, as_bytes
from felix_agent.datastore.etcd_tls import explain
from felix_agent.model import Record
from felix_agent.tasks import cancelled_from_outside

log = logging.getLogger("felix_agent.datastore.etcd")

WATCH_YIELD_EVERY = 32


class EtcdSyncer:
    """The Syncer for etcd (see base.py for the contract).

    `after_list(revision)` is awaited after every list, before the watch starts; tests use
    it to change etcd inside that window (e.g. compact it), metrics could count relists."""

    def __init__(self, store: EtcdStore, backoff: Backoff | None = None,
                 after_list: Callable[[int], Awaitable[None]] | None = None,
                 probe_interval: float = 10.0):
        self.store = store
        # Retrying a lost etcd is one cheap connection attempt; a short ceiling keeps an
        # agent from staying not-ready for many seconds after etcd is back.
        self.backoff = backoff or Backoff(initial=0.2, maximum=3.0)
        self.after_list = after_list
        self.lists = 0  # how many times the prefix was listed (initial + relists)
        self._state: EmittedState | None = None
        # Keys whose value is no record: key -> (why, raw value).  Counted, shown in the
        # agent's status, and (its own endpoints) removed by the agent's publisher, which
        # on_bad_record wakes.
        self.bad_records: dict[str, tuple[str, bytes]] = {}
        self.on_bad_record: Callable[[str], None] | None = None
        self.probe_interval = probe_interval
        # When the watch last showed it works (an event, or a probe that got through):
        # the agent's liveness reads it.
        self.last_progress = time.monotonic()

    async def run(self, emit: Emit) -> None:
        # Kept across runs: a supervisor that restarts this task gets only the difference.
        if self._state is None or self._state._emit is not emit:
            self._state = EmittedState(emit)
        state = self._state
        prefix = self.store.prefix
        while True:
            self.last_progress = time.monotonic()  # an attempt is progress; a hang is not
            try:
                revision = await self._list(state)
                if self.after_list is not None:
                    await self.after_list(revision)
                await self._watch(state, revision + 1)
                # The watch only ends on its own when etcd shut the stream: reconnect.
                raise EtcdUnavailable("watch stream ended")
            except asyncio.CancelledError:
                if not cancelled_from_outside():
                    raise EtcdUnavailable("etcd call cancelled under the syncer") from None
                await self.store.reset()
                raise
            except etcd_errors.RevisionCompactedError as e:
                # History we needed is gone: relist at once, the diff catches us up.
                log.info("etcd watch under %s hit compaction (%s); relisting", prefix, e)
                await self.store.reset()
            except Exception as e:
                reason = f"etcd {self.store.host}:{self.store.port}: {explain(self.store.tls, e) or type(e).__name__}"
                if state.in_sync or self.lists == 0:
                    log.warning("lost etcd connection: %s; retrying", reason)
                state.set_in_sync(False, reason)
                await self.store.reset()
                await asyncio.sleep(self.backoff.next())

    async def _list(self, state: EmittedState) -> int:
        # Page by page, each decoded and dropped before the next: only records are kept.
        revision = 0
        snapshot: dict[RecordId, Record] = {}
        bad: dict[str, tuple[str, bytes]] = {}
        async for revision, items in self.store.list_pages():
            for key, value in items:
                kind = keys.kind_of_key(self.store.prefix, key)
                if kind is None:
                    continue  # not a model object (e.g. IPAM's own bookkeeping keys)
                rec = self._decode(key, value, kind, bad)
                if rec is None:
                    # Keep what the consumer has for an object that turned invalid.
                    old = (kind, keys.record_key_of(self.store.prefix, kind, key))
                    if old in state.records:
                        snapshot[old] = state.records[old]
                    continue
                rid = (kind, rec.key)
                # A relist keeps the records the consumer has where they are unchanged, so the
                # new copies go page by page instead of the model being held twice.
                old = state.records.get(rid)
                snapshot[rid] = old if old == rec else rec
        self.lists += 1
        self.bad_records = bad
        state.replace(snapshot)
        state.set_in_sync(True)
        self.backoff.reset()
        return revision

    def _decode(self, key: str, value: bytes, kind: str, bad: dict) -> Record | None:
        rec = decode_checked(key, value, kind)
        if not isinstance(rec, str):
            bad.pop(key, None)
            return rec
        metrics.ERRORS.labels(kind="datastore_decode").inc()
        log.warning("skipping %s: %s", key, rec)
        bad[key] = (rec, value)
        if self.on_bad_record is not None:
            self.on_bad_record(key)
        return None

    async def _watch(self, state: EmittedState, start_revision: int) -> None:
        prefix = self.store.prefix + "/"
        async with self.store.connection() as c:
            # aetcd bounds the wait for "created", not its queueing before: bound both.
            watch = await asyncio.wait_for(c.watch_prefix(as_bytes(prefix), start_revision=start_revision),
                                           self.store.timeout * 2)
            self.last_progress = time.monotonic()
            failed: list[BaseException] = []
            probe = asyncio.create_task(self._probe(c, watch, failed))
            try:
                n = 0
                async for ev in watch:
                    self.last_progress = time.monotonic()
                    self._on_event(state, ev)
                    n += 1
                    if n % WATCH_YIELD_EVERY == 0:
                        # A burst arrives as many ready events: let CNI requests and the
                        # agent's loop in between, instead of decoding it all in one go.
                        await asyncio.sleep(0)
            finally:
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
                try:
                    await asyncio.wait_for(watch.cancel(), 2)
                except Exception:
                    pass
            if failed:
                raise EtcdUnavailable(f"watch probe failed: {failed[0] or type(failed[0]).__name__}")

    async def _probe(self, c: aetcd.Client, watch, failed: list[BaseException]) -> None:
        """A watch on a quiet prefix says nothing, also when its stream is dead (a frozen
        etcd, a half-open connection, or aetcd's stream task gone without telling its
        watches).  Every probe_interval without events: one read with a deadline on the
        same connection and a look at aetcd's stream task; if either fails, end the watch
        (the syncer relists)."""
        while True:
            await asyncio.sleep(self.probe_interval)
            if time.monotonic() - self.last_progress < self.probe_interval:
                continue  # events came: the stream works
            try:
                # aetcd's private stream task: done means no event will ever arrive.
                handler = getattr(getattr(c, "_watcher", None), "_request_handler", None)
                if handler is not None and handler.done():
                    raise EtcdUnavailable("the watch stream has ended")
                await asyncio.wait_for(c.get(as_bytes(self.store.prefix + "/")), self.store.timeout)
                self.last_progress = time.monotonic()
            except asyncio.CancelledError:
                if cancelled_from_outside():
                    raise
                failed.append(EtcdUnavailable("probe cancelled"))
            except Exception as e:
                failed.append(e)
            if failed:
                try:  # its first step wakes the `async for`, which then ends
                    await asyncio.wait_for(watch.cancel(), 2)
                except Exception:
                    pass
                return

    def _on_event(self, state: EmittedState, ev) -> None:
        key = ev.kv.key.decode()
        kind = keys.kind_of_key(self.store.prefix, key)
        if kind is None:
            return
        if ev.kind == "DELETE":
            self.bad_records.pop(key, None)
            state.update((kind, keys.record_key_of(self.store.prefix, kind, key)), None)
            return
        rec = self._decode(key, ev.kv.value, kind, self.bad_records)
        if rec is None:
            return  # logged; the consumer keeps the last valid version
        state.update((kind, rec.key), rec)
