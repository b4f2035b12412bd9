"""FanoutServer: the kubernetes syncer run once, its records kept as encoded frames, and
every connected agent served from them.

The syncer's events arrive on the event loop (KubernetesSyncer's contract). Each Update is
encoded ONCE into a frame; the frame replaces the record's entry in the snapshot and is
queued, as the same bytes object, for every client. A client that connects is registered
and given the snapshot in the same step of the loop, so nothing falls between the two: it
gets the snapshot, the status frame that ends it, then every frame queued since. Before
its first complete list the server has no snapshot: agents that connect wait (pinged).

Memory stays bounded whatever the clients do: a client's queue holds at most `max_queue`
frames (references to the shared frames) while its socket is full; one that falls further
behind (a slow reader, a stopped process) is disconnected, and reconnects and resyncs from
the snapshot. Writes wait for the socket (drain), so the transport buffers stay at asyncio's
high-water mark. Progress is in the metrics (REGISTRY, served by `tortie-fanout --metrics-port`),
next to the probes (`health()`): ready while the upstream watch is in sync, live while the
event loop turns.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from felix_agent.datastore.base import RecordId, Syncer
from felix_agent.datastore.fanout import protocol
from felix_agent.logs import kv
from felix_agent.model import Event, SyncStatus, Update

log = logging.getLogger("tortie.fanout")

REGISTRY = CollectorRegistry(auto_describe=True)
CLIENTS = Gauge("tortie_fanout_clients", "Agents connected", registry=REGISTRY)
IN_SYNC = Gauge("tortie_fanout_in_sync", "1 when the fan-out is in sync with the API", registry=REGISTRY)
OBJECTS = Gauge("tortie_fanout_records", "Records in the snapshot", registry=REGISTRY)
CONNECTIONS = Counter("tortie_fanout_connections_total", "Agent connections accepted", registry=REGISTRY)
REFUSED = Counter("tortie_fanout_refused_total", "Connections refused at the hello", registry=REGISTRY)
SLOW = Counter("tortie_fanout_slow_disconnects_total",
               "Agents disconnected for falling max_queue frames behind", registry=REGISTRY)

SNAPSHOT_CHUNK = 256  # frames per write while sending a snapshot (then wait for the socket)


@dataclass(eq=False)
class _Client:
    node: str
    peer: str
    writer: asyncio.StreamWriter
    queue: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cut_off: str = ""  # why the server dropped it
    draining: bool = False  # its sender waits for the socket: the agent is not reading fast enough

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        self.draining = True
        try:
            await self.writer.drain()
        finally:
            self.draining = False


class FanoutServer:
    def __init__(self, syncer: Syncer, *, max_queue: int = 10_000, ping_interval: float = 10.0,
                 hello_timeout: float = 10.0, liveness_timeout: float = 60.0):
        self.syncer = syncer
        self.max_queue = max_queue
        self.ping_interval = ping_interval
        self.hello_timeout = hello_timeout
        self.snapshot: dict[RecordId, bytes] = {}
        self.status = SyncStatus(False)  # no reason: the first list is in progress (protocol.py)
        self._status_frame = protocol.status_frame(self.status)
        self.clients: set[_Client] = set()
        self.synced_once = asyncio.Event()
        self.liveness_timeout = liveness_timeout
        self.last_tick = time.monotonic()  # run()'s ticker: the event loop turns

    def health(self) -> dict:
        """What /readyz and /livez answer (read from the HTTP thread).  Ready: the upstream
        watch is in sync, so an agent that connects gets a whole snapshot (before the first
        list it would only wait; after a lost watch it would get stale records).  Live: the
        event loop has turned within liveness_timeout (a stuck loop serves nobody)."""
        status, stalled = self.status, time.monotonic() - self.last_tick
        reasons = {}
        if not status.in_sync:
            reasons["upstream"] = status.reason or "the first list of the API is in progress"
        if stalled > self.liveness_timeout:
            reasons["loop"] = f"no tick for {stalled:.0f}s"
        return {"ready": status.in_sync, "live": stalled <= self.liveness_timeout, "clients": len(self.clients),
                "records": len(self.snapshot), "reasons": reasons}

    # --- the syncer's side ---

    def on_event(self, ev: Event) -> None:
        """The syncer's emit: keep the snapshot, queue the frame for every client."""
        if isinstance(ev, Update):
            f = protocol.update_frame(ev.kind, ev.key, ev.value)
            rid = (ev.kind, ev.key)
            if ev.value is None:
                self.snapshot.pop(rid, None)
            else:
                self.snapshot[rid] = f
            OBJECTS.set(len(self.snapshot))
        else:
            self.status = ev
            f = self._status_frame = protocol.status_frame(ev)
            IN_SYNC.set(1 if ev.in_sync else 0)
            if ev.in_sync:
                self.synced_once.set()
                log.info("in sync with the API", extra=kv(records=len(self.snapshot), clients=len(self.clients)))
            else:
                log.warning("out of sync with the API", extra=kv(reason=ev.reason))
        for c in list(self.clients):
            self._push(c, f)

    def _push(self, c: _Client, f: bytes) -> None:
        if c.cut_off:
            return
        # Only a client whose socket is full counts as behind: one whose sender has simply
        # not run yet (a burst of events in one step of the loop) costs one reference a frame.
        if c.draining and len(c.queue) >= self.max_queue:
            c.cut_off = f"fell {len(c.queue)} updates behind"
            SLOW.inc()
            log.warning("disconnecting a slow agent; it reconnects and resyncs",
                        extra=kv(node=c.node, peer=c.peer, reason=c.cut_off))
            c.queue.clear()
            c.writer.transport.abort()
            c.wake.set()
            return
        c.queue.append(f)
        c.wake.set()

    # --- the clients' side ---

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port)

    async def run(self, host: str, port: int) -> None:
        """Listen, run the syncer, until cancelled."""
        server = await self.serve(host, port)
        sync = asyncio.create_task(self.syncer.run(self.on_event), name="syncer")
        ticker = asyncio.create_task(self._tick(), name="ticker")
        log.info("listening", extra=kv(address=f"{host}:{port}"))
        try:
            await sync  # runs until cancelled
        finally:
            sync.cancel()
            ticker.cancel()
            server.close()
            for c in list(self.clients):
                c.writer.transport.abort()

    async def _tick(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            await asyncio.sleep(1)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            msg = await asyncio.wait_for(protocol.read_message(reader), self.hello_timeout)
            node = protocol.check_hello(msg)
        except protocol.ProtocolError as e:
            REFUSED.inc()
            log.warning("refused a connection", extra=kv(peer=peer, reason=str(e)))
            writer.write(protocol.refused(str(e)))
            await _close(writer)
            return
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
            await _close(writer)  # no hello: a port probe, or a peer gone
            return
        c = _Client(node, peer, writer)
        writer.write(protocol.welcome(self.ping_interval))
        try:
            # Until its first list is complete the server has no snapshot to give: an
            # agent's resync against a partial one would delete what it has not reached.
            while not self.synced_once.is_set():
                try:
                    await asyncio.wait_for(self.synced_once.wait(), self.ping_interval)
                except asyncio.TimeoutError:
                    writer.write(protocol.PING)
                    await writer.drain()
        except (ConnectionError, OSError):
            await _close(writer)
            return
        # Registration and the snapshot in one step: every later frame lands in c.queue.
        frames = list(self.snapshot.values())
        frames.append(self._status_frame)
        self.clients.add(c)
        CLIENTS.set(len(self.clients))
        CONNECTIONS.inc()
        log.info("agent connected", extra=kv(node=node, peer=peer, records=len(frames) - 1))
        eof = asyncio.create_task(reader.read(1))  # the agent never sends more: EOF = it left
        eof.add_done_callback(lambda t: (t.cancelled() or t.exception(), c.wake.set()))  # a reset is an EOF too
        try:
            for i in range(0, len(frames), SNAPSHOT_CHUNK):
                await c.send(b"".join(frames[i:i + SNAPSHOT_CHUNK]))
            del frames
            while not c.cut_off and not eof.done():
                if not c.queue:
                    c.wake.clear()
                    try:
                        await asyncio.wait_for(c.wake.wait(), self.ping_interval)
                    except asyncio.TimeoutError:
                        c.queue.append(protocol.PING)
                    continue
                batch = b"".join(c.queue)
                c.queue.clear()
                await c.send(batch)
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients.discard(c)
            CLIENTS.set(len(self.clients))
            eof.cancel()
            log.info("agent disconnected", extra=kv(node=node, peer=peer, reason=c.cut_off or "it left"))
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
