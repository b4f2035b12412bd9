"""EtcdStore: reads and writes model objects in etcd over one connection of its own, and
the compare-and-swap primitives the datastore's publisher builds on (felix_agent.datastore
.publisher).  Lists come in pages at one revision, so memory stays flat however big the
cluster."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc
from aetcd.utils import prefix_range_end

from felix_agent.datastore import keys
from felix_agent.datastore.base import convert_or_log
from felix_agent.datastore.convert import from_k8s
from felix_agent.datastore.etcd.records import decode, encode_record, record_key
from felix_agent.datastore.etcd_tls import EtcdTLS, TLSClient, explain
from felix_agent.model import Record
from felix_agent.tasks import cancelled_from_outside

log = logging.getLogger("felix_agent.datastore.etcd")

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
TXN_MAX_OPS = 128


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


def as_bytes(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


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
            if cancelled_from_outside():
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
        await self._call(lambda c: c.put(as_bytes(key), value))
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
        ops = [c.transactions.put(as_bytes(record_key(self.prefix, r)), encode_record(r)) for r in records]
        for i in range(0, len(ops), TXN_MAX_OPS):
            chunk = ops[i:i + TXN_MAX_OPS]
            await self._call(lambda c, chunk=chunk: c.transaction(compare=[], success=chunk, failure=[]))

    async def delete(self, kind: str, name: str, namespace: str = "") -> bool:
        """Delete one object; False when it did not exist."""
        key = keys.object_key(self.prefix, kind, name, namespace)
        res = await self._call(lambda c: c.delete(as_bytes(key)))
        return bool(res and res.deleted)

    async def get(self, kind: str, name: str, namespace: str = "") -> Record | None:
        key = keys.object_key(self.prefix, kind, name, namespace)
        kv = await self._call(lambda c: c.get(as_bytes(key)))
        if kv is None:
            return None
        return convert_or_log(json.loads(kv.value), kind, key)

    async def get_all(self, kind: str) -> list[Record]:
        """Every valid record of a kind (invalid values are logged and left out)."""
        plural = keys.PLURAL[kind]
        _, items = await self.list_prefix(f"{self.prefix}/{plural}/")
        out = []
        for key, value in items:
            rec = decode(key, value, kind)
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
        start = as_bytes(prefix or self.prefix + "/")
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
        kv = await self._call(lambda c: c.get(as_bytes(key)))
        return None if kv is None else kv.value

    async def create_if_absent(self, key: str, value: str | bytes) -> bool:
        """Write key only if it does not exist (version == 0), in one transaction: of two
        nodes racing for the same block exactly one gets True."""
        k, v = as_bytes(key), as_bytes(value)

        async def txn(c):
            ok, _ = await c.transaction(compare=[c.transactions.version(k) == 0],
                                        success=[c.transactions.put(k, v)], failure=[])
            return ok
        return await self._call(txn)

    async def delete_if_value(self, key: str, value: str | bytes) -> bool:
        """Delete key only if it still holds exactly `value` (a release never removes a
        claim somebody else has made since)."""
        k, v = as_bytes(key), as_bytes(value)

        async def txn(c):
            ok, _ = await c.transaction(compare=[c.transactions.value(k) == v],
                                        success=[c.transactions.delete(k)], failure=[])
            return ok
        return await self._call(txn)

    async def replace_if_value(self, key: str, old: str | bytes, new: str | bytes) -> bool:
        """Set key to `new` only if it holds `old`."""
        k, o, n = as_bytes(key), as_bytes(old), as_bytes(new)

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
