"""The etcd v3 datastore: every model object as Kubernetes-shaped JSON under one prefix
(layout in keys.py), written by tortiectl, the IPAM and the agents, watched by EtcdSyncer.

EtcdStore is the read/write side (records, objects, and the compare-and-swap primitives
IPAM claims blocks with); EtcdSyncer is the Syncer (base.py): list the prefix, emit, watch
from the list revision + 1, and on any connection loss reconnect and relist, emitting only
the difference. A watch that starts from a compacted revision also relists.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc
from aetcd.utils import prefix_range_end

from felix_agent import metrics, model
from felix_agent.datastore.convert import ConvertError, from_k8s, to_k8s
from felix_agent.model import Record
from felix_agent.datastore import keys
from felix_agent.datastore.base import Backoff, Emit, EmittedState, RecordId, convert_or_log
from felix_agent.datastore.etcd_tls import EtcdTLS, TLSClient, explain

log = logging.getLogger(__name__)

# A fresh gRPC channel reconnects at once; these keep a long-lived one from sleeping for
# minutes in gRPC's default reconnect backoff, and notice a dead peer on an idle watch.
_GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
    "grpc.keepalive_permit_without_calls": 1,
    # gRPC stops pinging after 2 pings with no data by default: an idle watch behind a
    # frozen etcd (SIGSTOP) or a half-open connection then went unnoticed for good.
    "grpc.http2.max_pings_without_data": 0,
    # Lists come in pages (LIST_PAGE_KEYS keys; a page too big for this is fetched again in
    # halves), so no reply grows with the cluster: the limit only has to hold one object,
    # which etcd caps at its request size (--max-request-bytes, 1.5 MiB by default).
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
}
# aetcd errors that mean "this call did not get through", retried by the caller; the
# others (a bad argument, a compacted revision) are answers.
_UNAVAILABLE = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                etcd_errors.WatchTimeoutError, etcd_errors.InternalError, asyncio.TimeoutError)
LIST_PAGE_KEYS = 1000
WATCH_YIELD_EVERY = 32


def _cancelled_from_outside() -> bool:
    """True when the current task itself is being cancelled (shutdown, a timeout around
    the caller), as opposed to gRPC raising CancelledError because a channel closed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class EtcdUnavailable(ConnectionError):
    """etcd could not be reached (or did not answer in time)."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"127.0.0.1:2379" or "http://127.0.0.1:2379" -> (host, port). The first of a
    comma-separated list is used."""
    ep = endpoint.split(",")[0].strip()
    for scheme in ("http://", "https://"):
        if ep.startswith(scheme):
            ep = ep[len(scheme):]
    host, sep, port = ep.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def record_name(record: Record) -> tuple[str, str, str]:
    """(kind, name, namespace) as keys.object_key wants them."""
    kind = model.KIND_OF[type(record)]
    if kind in keys.NAMESPACED:
        return kind, record.name, record.namespace
    return kind, record.key, ""  # WorkloadEndpoint: node/ns/pod; BlockAffinity: the cidr


def record_key(prefix: str, record: Record) -> str:
    kind, name, ns = record_name(record)
    return keys.object_key(prefix, kind, name, ns)


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


def encode_record(record: Record) -> bytes:
    """The stored form of a record: its Kubernetes-shaped JSON, compact with sorted keys, so
    equal records are equal bytes (what delete_if_value compares)."""
    return json.dumps(to_k8s(record), sort_keys=True, separators=(",", ":")).encode()


TXN_MAX_OPS = 128


class EtcdStore:
    """Reads and writes model objects in etcd. Every method raises EtcdUnavailable when
    etcd cannot be reached; the next call reconnects.

    A failing call never tears down other calls: it retires the client (later calls open
    a new one) and the retired client is closed only once its last call in flight has
    returned.  gRPC raises CancelledError in every call of a channel that closes; that
    is an EtcdUnavailable here unless the calling task itself is being cancelled.  Every
    unary call has a deadline (`timeout`); watches are watched by EtcdSyncer's probe."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2379,
                 prefix: str = keys.DEFAULT_PREFIX, timeout: float = 5.0, tls: EtcdTLS | None = None):
        self.host, self.port = host, port
        self.tls = tls  # None: plaintext
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self._client: aetcd.Client | None = None
        self._users: dict[aetcd.Client, int] = {}  # calls in flight per client
        self._closing: set[asyncio.Task] = set()

    @classmethod
    def from_endpoint(cls, endpoint: str, prefix: str = keys.DEFAULT_PREFIX,
                      tls: EtcdTLS | None = None) -> "EtcdStore":
        host, port = parse_endpoint(endpoint)
        return cls(host, port, prefix, tls=tls)

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            kw = dict(host=self.host, port=self.port, timeout=self.timeout, options=dict(_GRPC_OPTIONS))
            self._client = TLSClient(self.tls, **kw) if self.tls else aetcd.Client(**kw)
        return self._client

    def clone(self) -> "EtcdStore":
        """A store on the same etcd with a connection of its own (one per concern: the
        watch does not share a channel with the ADD path)."""
        return type(self)(self.host, self.port, self.prefix, self.timeout, tls=self.tls)

    async def reset(self) -> None:
        """Drop the connection; the next call opens a new one.  Calls in flight on the
        old one finish first (it is closed after the last of them)."""
        c, self._client = self._client, None
        if c is not None and not self._users.get(c):
            self._users.pop(c, None)
            await _close_client(c)

    def _retire(self, c: aetcd.Client) -> None:
        if self._client is c:
            self._client = None

    async def close(self) -> None:
        await self.reset()
        for t in list(self._closing):
            await t

    async def __aenter__(self) -> "EtcdStore":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aetcd.Client]:
        """The client, held for the block (a watch holds it while it is read): errors
        become EtcdUnavailable and retire the client without closing it under others."""
        c = self.client
        self._users[c] = self._users.get(c, 0) + 1
        try:
            yield c
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            self._retire(c)
            raise EtcdUnavailable(f"etcd at {self.host}:{self.port}: call cancelled "
                                  "(its connection closed)") from None
        except _UNAVAILABLE as e:
            self._retire(c)
            raise EtcdUnavailable(f"etcd at {self.host}:{self.port}: {explain(self.tls, e) or type(e).__name__}") from e
        finally:
            self._users[c] -= 1
            if not self._users[c] and c is not self._client:
                del self._users[c]
                task = asyncio.get_running_loop().create_task(_close_client(c))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable]):
        async with self.connection() as c:
            return await fn(c)

    # --- objects ---

    async def put_record(self, record: Record) -> str:
        """Store a record (as its Kubernetes-shaped JSON); returns the key."""
        key = record_key(self.prefix, record)
        value = encode_record(record)
        await self._call(lambda c: c.put(_b(key), value))
        return key

    async def put_object(self, obj: dict) -> Record:
        """Validate a Kubernetes-shaped object with from_k8s (ConvertError when invalid:
        nothing is written), then store it."""
        record = from_k8s(obj)
        await self.put_record(record)
        return record

    async def put_records(self, records: list[Record]) -> None:
        """Store several records, in transactions of at most TXN_MAX_OPS (etcd's default
        --max-txn-ops is 128): all or nothing up to that size; larger sets go in chunks."""
        c = self.client
        ops = [c.transactions.put(_b(record_key(self.prefix, r)), encode_record(r)) for r in records]
        for i in range(0, len(ops), TXN_MAX_OPS):
            chunk = ops[i:i + TXN_MAX_OPS]
            await self._call(lambda c, chunk=chunk: c.transaction(compare=[], success=chunk, failure=[]))

    async def delete(self, kind: str, name: str, namespace: str = "") -> bool:
        """Delete one object; False when it did not exist."""
        key = keys.object_key(self.prefix, kind, name, namespace)
        res = await self._call(lambda c: c.delete(_b(key)))
        return bool(res and res.deleted)

    async def get(self, kind: str, name: str, namespace: str = "") -> Record | None:
        key = keys.object_key(self.prefix, kind, name, namespace)
        kv = await self._call(lambda c: c.get(_b(key)))
        if kv is None:
            return None
        return convert_or_log(json.loads(kv.value), kind, key)

    async def get_all(self, kind: str) -> list[Record]:
        """Every valid record of a kind (invalid values are logged and left out)."""
        plural = keys.PLURAL[kind]
        _, items = await self.list_prefix(f"{self.prefix}/{plural}/")
        out = []
        for key, value in items:
            rec = _decode(key, value, kind)
            if rec is not None:
                out.append(rec)
        return out

    async def list_prefix(self, prefix: str | None = None) -> tuple[int, list[tuple[str, bytes]]]:
        """(store revision, [(key, value)]) for every key under the prefix."""
        revision, items = 0, []
        async for revision, page in self.list_pages(prefix):
            items.extend(page)
        return revision, items

    async def list_pages(self, prefix: str | None = None, page_keys: int = LIST_PAGE_KEYS):
        """Every key under the prefix as it was at one revision, in pages: yields (revision,
        [(key, value)]) per page of at most `page_keys` keys, so a caller can decode a page
        and drop it before the next arrives (memory stays flat however big the cluster).
        Each page after the first is read at the first page's revision and starts after the
        last key seen; a compaction in between raises RevisionCompactedError (relist)."""
        start = _b(prefix or self.prefix + "/")
        end = prefix_range_end(start)
        revision, limit = 0, page_keys
        while True:
            req = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
            try:
                res = await self._call(lambda c: _range(c, req))
            except _PageTooBig:
                if limit == 1:
                    raise
                limit = max(1, limit // 2)  # a page of unusually big objects: smaller pages
                continue
            if not revision:
                revision = res.header.revision
            kvs = res.kvs
            yield revision, [(kv.key.decode(), kv.value) for kv in kvs]
            if not res.more or not kvs:
                return
            start = kvs[-1].key + b"\0"
            limit = page_keys

    # --- compare-and-swap primitives (IPAM) ---

    async def get_value(self, key: str) -> bytes | None:
        kv = await self._call(lambda c: c.get(_b(key)))
        return None if kv is None else kv.value

    async def create_if_absent(self, key: str, value: str | bytes) -> bool:
        """Write key only if it does not exist (version == 0), in one transaction: of two
        nodes racing for the same block exactly one gets True."""
        k, v = _b(key), _b(value)

        async def txn(c):
            ok, _ = await c.transaction(compare=[c.transactions.version(k) == 0],
                                        success=[c.transactions.put(k, v)], failure=[])
            return ok
        return await self._call(txn)

    async def delete_if_value(self, key: str, value: str | bytes) -> bool:
        """Delete key only if it still holds exactly `value` (a release never removes a
        claim somebody else has made since)."""
        k, v = _b(key), _b(value)

        async def txn(c):
            ok, _ = await c.transaction(compare=[c.transactions.value(k) == v],
                                        success=[c.transactions.delete(k)], failure=[])
            return ok
        return await self._call(txn)

    async def replace_if_value(self, key: str, old: str | bytes, new: str | bytes) -> bool:
        """Set key to `new` only if it holds `old`."""
        k, o, n = _b(key), _b(old), _b(new)

        async def txn(c):
            ok, _ = await c.transaction(compare=[c.transactions.value(k) == o],
                                        success=[c.transactions.put(k, n)], failure=[])
            return ok
        return await self._call(txn)

    async def compact(self, revision: int) -> None:
        await self._call(lambda c: c.compact(revision, physical=True))


async def _close_client(c: aetcd.Client) -> None:
    try:
        await asyncio.wait_for(c.close(), 2)
    except Exception:  # closing a broken channel may fail; it is gone either way
        pass


class _PageTooBig(etcd_errors.ClientError):
    """A page's reply exceeded the receive limit (gRPC RESOURCE_EXHAUSTED)."""


async def _range(c: aetcd.Client, req) -> object:
    """One Range RPC with limit and revision, which aetcd's get_prefix does not pass on;
    errors are mapped to aetcd's exceptions as its own calls do."""
    await c.connect()
    try:
        return await c.kvstub.Range(req, timeout=c._timeout, metadata=c.metadata)
    except rpc.AioRpcError as e:
        if e.code() == rpc.StatusCode.RESOURCE_EXHAUSTED:
            raise _PageTooBig(e.details()) from e
        etcd_errors._handle_exception(e)


def _decode(key: str, value: bytes, kind: str) -> Record | None:
    """The record a key holds, or None (logged) when it holds none (see _decode_checked)."""
    rec = _decode_checked(key, value, kind)
    if isinstance(rec, str):
        log.warning("skipping %s: %s", key, rec)
        return None
    return rec


def _decode_checked(key: str, value: bytes, kind: str) -> Record | str:
    """The record a key holds, or why it holds none: the value is not valid JSON, does not
    convert, or belongs under a different key (which would break deletions)."""
    try:
        obj = json.loads(value)
    except ValueError as e:
        return f"not JSON ({e})"
    try:
        rec = from_k8s(obj, kind)
    except ConvertError as e:
        return f"invalid object: {e}"
    if model.KIND_OF[type(rec)] != kind:
        return f"holds a {model.KIND_OF[type(rec)]}, not a {kind}"
    prefix = key[: key.index("/" + keys.PLURAL[kind] + "/")]
    if record_key(prefix, rec) != key:
        return f"the object inside belongs at {record_key(prefix, rec)}"
    return rec


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
        self._key_ids: dict[str, RecordId] = {}
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
                if not _cancelled_from_outside():
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
        key_ids: dict[str, RecordId] = {}
        bad: dict[str, tuple[str, bytes]] = {}
        async for revision, items in self.store.list_pages():
            for key, value in items:
                kind = keys.kind_of_key(self.store.prefix, key)
                if kind is None:
                    continue  # not a model object (e.g. IPAM's own bookkeeping keys)
                rec = self._decode(key, value, kind, bad)
                if rec is None:
                    # Keep what the consumer has for an object that turned invalid.
                    old = self._key_ids.get(key)
                    if old is not None and old in state.records:
                        snapshot[old] = state.records[old]
                        key_ids[key] = old
                    continue
                rid = (kind, rec.key)
                snapshot[rid] = rec
                key_ids[key] = rid
        self.lists += 1
        self._key_ids = key_ids
        self.bad_records = bad
        state.replace(snapshot)
        state.set_in_sync(True)
        self.backoff.reset()
        return revision

    def _decode(self, key: str, value: bytes, kind: str, bad: dict) -> Record | None:
        rec = _decode_checked(key, value, kind)
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
            watch = await asyncio.wait_for(c.watch_prefix(_b(prefix), start_revision=start_revision),
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
                await asyncio.wait_for(c.get(_b(self.store.prefix + "/")), self.store.timeout)
                self.last_progress = time.monotonic()
            except asyncio.CancelledError:
                if _cancelled_from_outside():
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
            rid = self._key_ids.pop(key, None)
            if rid is not None:
                state.update(rid, None)
            return
        rec = self._decode(key, ev.kv.value, kind, self.bad_records)
        if rec is None:
            return  # logged; the consumer keeps the last valid version
        rid = (kind, rec.key)
        self._key_ids[key] = rid
        state.update(rid, rec)


__all__ = ["EtcdStore", "EtcdSyncer", "EtcdUnavailable", "encode_record", "parse_endpoint", "record_key"]
