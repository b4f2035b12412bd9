"""The etcd v3 datastore: every model object as Kubernetes-shaped JSON under one prefix
(layout in keys.py), written by tortiectl, the IPAM and the agents, watched by EtcdSyncer.

EtcdStore is the read/write side (records, objects, and the compare-and-swap primitives
IPAM claims blocks with); EtcdSyncer is the Syncer (base.py): list the prefix, emit, watch
from the list revision + 1, and on any connection loss reconnect and relist, emitting only
the difference. A watch that starts from a compacted revision also relists.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc
from aetcd.utils import prefix_range_end

from .. import model
from ..convert import from_k8s, to_k8s
from ..model import Record
from . import keys
from .base import Backoff, Emit, EmittedState, RecordId, convert_or_log

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
    # Lists come in pages (LIST_PAGE_KEYS keys; a page too big for this is fetched again in
    # halves), so no reply grows with the cluster: the limit only has to hold one object,
    # which etcd caps at its request size (--max-request-bytes, 1.5 MiB by default).
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
}
LIST_PAGE_KEYS = 1000
WATCH_YIELD_EVERY = 32


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
    etcd cannot be reached; the next call reconnects."""

    def __init__(self, host: str = "127.0.0.1", port: int = 2379,
                 prefix: str = keys.DEFAULT_PREFIX, timeout: float = 5.0):
        self.host, self.port = host, port
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self._client: aetcd.Client | None = None

    @classmethod
    def from_endpoint(cls, endpoint: str, prefix: str = keys.DEFAULT_PREFIX) -> "EtcdStore":
        host, port = parse_endpoint(endpoint)
        return cls(host, port, prefix)

    @property
    def client(self) -> aetcd.Client:
        if self._client is None:
            self._client = aetcd.Client(host=self.host, port=self.port, timeout=self.timeout,
                                        options=dict(_GRPC_OPTIONS))
        return self._client

    async def reset(self) -> None:
        """Drop the connection; the next call opens a new one."""
        c, self._client = self._client, None
        if c is not None:
            try:
                await asyncio.wait_for(c.close(), 2)
            except Exception:  # closing a broken channel may fail; it is gone either way
                pass

    async def close(self) -> None:
        await self.reset()

    async def __aenter__(self) -> "EtcdStore":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable]):
        try:
            return await fn(self.client)
        except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                etcd_errors.WatchTimeoutError, asyncio.TimeoutError) as e:
            await self.reset()
            raise EtcdUnavailable(f"etcd at {self.host}:{self.port}: {e or type(e).__name__}") from e

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
    """The record a key holds, or None (logged) when the value is not valid JSON, does not
    convert, or belongs under a different key (which would break deletions)."""
    try:
        obj = json.loads(value)
    except ValueError as e:
        log.warning("skipping %s: not JSON (%s)", key, e)
        return None
    rec = convert_or_log(obj, kind, key)
    if rec is None:
        return None
    if model.KIND_OF[type(rec)] != kind:
        log.warning("skipping %s: holds a %s, not a %s", key, model.KIND_OF[type(rec)], kind)
        return None
    prefix = key[: key.index("/" + keys.PLURAL[kind] + "/")]
    if record_key(prefix, rec) != key:
        log.warning("skipping %s: the object inside belongs at %s", key, record_key(prefix, rec))
        return None
    return rec


class EtcdSyncer:
    """The Syncer for etcd (see base.py for the contract).

    `after_list(revision)` is awaited after every list, before the watch starts; tests use
    it to change etcd inside that window (e.g. compact it), metrics could count relists."""

    def __init__(self, store: EtcdStore, backoff: Backoff | None = None,
                 after_list: Callable[[int], Awaitable[None]] | None = None):
        self.store = store
        # Retrying a lost etcd is one cheap connection attempt; a short ceiling keeps an
        # agent from staying not-ready for many seconds after etcd is back.
        self.backoff = backoff or Backoff(initial=0.2, maximum=3.0)
        self.after_list = after_list
        self.lists = 0  # how many times the prefix was listed (initial + relists)
        self._key_ids: dict[str, RecordId] = {}

    async def run(self, emit: Emit) -> None:
        state = EmittedState(emit)
        prefix = self.store.prefix
        while True:
            try:
                revision = await self._list(state)
                if self.after_list is not None:
                    await self.after_list(revision)
                await self._watch(state, revision + 1)
                # The watch only ends on its own when etcd shut the stream: reconnect.
                raise EtcdUnavailable("watch stream ended")
            except asyncio.CancelledError:
                await self.store.reset()
                raise
            except etcd_errors.RevisionCompactedError as e:
                # History we needed is gone: relist at once, the diff catches us up.
                log.info("etcd watch under %s hit compaction (%s); relisting", prefix, e)
                await self.store.reset()
            except Exception as e:
                reason = f"etcd {self.store.host}:{self.store.port}: {e or type(e).__name__}"
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
        async for revision, items in self.store.list_pages():
            for key, value in items:
                kind = keys.kind_of_key(self.store.prefix, key)
                if kind is None:
                    continue  # not a model object (e.g. IPAM's own bookkeeping keys)
                rec = _decode(key, value, kind)
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
        state.replace(snapshot)
        state.set_in_sync(True)
        self.backoff.reset()
        return revision

    async def _watch(self, state: EmittedState, start_revision: int) -> None:
        prefix = self.store.prefix + "/"
        watch = await self.store._call(
            lambda c: c.watch_prefix(_b(prefix), start_revision=start_revision))
        try:
            n = 0
            async for ev in watch:
                n += 1
                if n % WATCH_YIELD_EVERY == 0:
                    # A burst arrives as many ready events: let CNI requests and the agent's
                    # loop in between, instead of decoding the whole burst in one go.
                    await asyncio.sleep(0)
                key = ev.kv.key.decode()
                kind = keys.kind_of_key(self.store.prefix, key)
                if kind is None:
                    continue
                if ev.kind == "DELETE":
                    rid = self._key_ids.pop(key, None)
                    if rid is not None:
                        state.update(rid, None)
                    continue
                rec = _decode(key, ev.kv.value, kind)
                if rec is None:
                    continue  # logged; the consumer keeps the last valid version
                rid = (kind, rec.key)
                self._key_ids[key] = rid
                state.update(rid, rec)
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 2)
            except Exception:
                pass


__all__ = ["EtcdStore", "EtcdSyncer", "EtcdUnavailable", "encode_record", "parse_endpoint", "record_key"]
