"""FanoutSyncer: the agent's Syncer (base.py's contract) over one TCP connection to a
tortie-fanout server, in place of its own watches on the Kubernetes API.

Per connection: hello -> welcome -> the server's snapshot, collected until the status
frame that ends it, then handed to EmittedState.replace, so a reconnect emits only the
difference against what the agent already has (deletions for records that vanished while
it was away, nothing for records that did not change) -> updates and status changes as
they come. Any failure (refused, closed, reset, silent for three ping intervals) gives
SyncStatus(False) once, a backoff, and the next endpoint; the agent keeps its records and
dataplane meanwhile, exactly as when the API itself is lost.
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import Sequence

from felix_agent.datastore.base import Backoff, Emit, EmittedState, RecordId
from felix_agent.datastore.fanout import protocol
from felix_agent.datastore.fanout.protocol import BadRecord, ProtocolError
from felix_agent.logs import kv
from felix_agent.model import Record

log = logging.getLogger("tortie.fanout.client")

YIELD_EVERY = 500  # frames between yields to the loop while a snapshot streams in


class FanoutRefused(Exception):
    """The server refused the hello; the message is the server's."""


class FanoutSyncer:
    def __init__(self, endpoints: Sequence[tuple[str, int]], node: str, *, backoff: Backoff | None = None,
                 connect_timeout: float = 5.0):
        if not endpoints:
            raise ValueError("FanoutSyncer needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.node = node
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        self.last_progress = time.monotonic()  # the agent's liveness check reads it
        self.sessions = 0  # connections that got past the hello (tests)

    async def run(self, emit: Emit) -> None:
        state = EmittedState(emit)
        # Agents spread over the servers by name; on a failure each moves to the next.
        i = zlib.crc32(self.node.encode()) % len(self.endpoints)
        while True:
            host, port = self.endpoints[i]
            where = f"tortie-fanout {host}:{port}"
            self.last_progress = time.monotonic()
            try:
                await self._session(host, port, state)
                reason = f"{where} closed the connection"
            except FanoutRefused as e:
                reason = f"{where} refused this agent: {e}"
                log.error("the fan-out server refused this agent", extra=kv(server=where, reason=str(e)))
            except ProtocolError as e:
                reason = f"{where}: {e}"
            except (OSError, EOFError, asyncio.TimeoutError) as e:  # IncompleteReadError is an EOFError
                reason = f"{where}: {type(e).__name__}: {e}" if str(e) else f"{where}: {type(e).__name__}"
            if state.in_sync:
                log.warning("lost the fan-out server; reconnecting", extra=kv(reason=reason))
            state.set_in_sync(False, reason)
            i = (i + 1) % len(self.endpoints)
            await asyncio.sleep(self.backoff.next())

    async def _session(self, host: str, port: int, state: EmittedState) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
        watchdog = None
        try:
            writer.write(protocol.hello(self.node))
            msg = await asyncio.wait_for(protocol.read_message(reader), self.connect_timeout)
            if msg["type"] == "refused":
                raise FanoutRefused(str(msg.get("message", "")))
            if msg["type"] != "welcome" or msg.get("version") != protocol.PROTOCOL_VERSION:
                raise ProtocolError(f"expected a version {protocol.PROTOCOL_VERSION} welcome, got "
                                    f"{msg['type']!r} version {msg.get('version')!r}")
            self.sessions += 1
            silent_limit = 3 * float(msg.get("ping_interval") or 10.0) + self.connect_timeout
            watchdog = asyncio.create_task(self._watchdog(writer, silent_limit))
            where = f"{host}:{port}"
            snapshot: dict[RecordId, Record] = {}
            n = 0
            while True:  # the snapshot, up to the status frame that ends it
                msg = await protocol.read_message(reader)
                self.last_progress = time.monotonic()
                if msg["type"] == "status":
                    break
                if msg["type"] == "update":
                    u = protocol.decode_update(msg)
                    rid = (u.kind, u.key)
                    if isinstance(u, BadRecord):
                        _log_bad(u, where)
                        if rid in state.records:  # keep what the agent has, as a relist does
                            snapshot[rid] = state.records[rid]
                    elif u.value is None:
                        snapshot.pop(rid, None)
                    else:
                        snapshot[rid] = u.value
                n += 1
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # CNI requests wait for no snapshot
            n = state.replace(snapshot)
            del snapshot
            self.backoff.reset()
            log.info("synced from the fan-out server", extra=kv(server=where, changes=n))
            while True:
                if msg["type"] == "status":
                    st = protocol.decode_status(msg)
                    if st.in_sync or st.reason:  # no reason: the server's first list, nothing lost
                        state.set_in_sync(st.in_sync, f"tortie-fanout {where}: {st.reason}")
                elif msg["type"] == "update":
                    u = protocol.decode_update(msg)
                    if isinstance(u, BadRecord):
                        _log_bad(u, where)
                    else:
                        state.update((u.kind, u.key), u.value)
                elif msg["type"] != "ping":
                    raise ProtocolError(f"an unexpected {msg['type']!r} message")
                msg = await protocol.read_message(reader)
                self.last_progress = time.monotonic()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            writer.transport.abort()

    async def _watchdog(self, writer: asyncio.StreamWriter, silent_limit: float) -> None:
        """A server that stops sending (host gone, network cut: no FIN ever arrives) is
        given up after three missed pings."""
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - self.last_progress > silent_limit:
                log.warning("the fan-out server went silent", extra=kv(seconds=round(silent_limit)))
                writer.transport.abort()
                return


def _log_bad(u: BadRecord, where: str) -> None:
    log.warning("skipping an invalid record from the fan-out server",
                extra=kv(server=where, kind=u.kind, key=u.key, reason=u.why))
