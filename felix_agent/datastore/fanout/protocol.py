"""What a fan-out server and its clients say to each other over TCP.

Framing: every message is a 4-byte big-endian length, then that many bytes of compact JSON
(one object). A record travels as its Kubernetes-shaped object (convert.to_k8s, the shape
etcd stores), so the client checks it with the same from_k8s every datastore uses.

    client -> server   {"type": "hello", "version": 1, "node": "<node name>"}
    server -> client   {"type": "welcome", "version": 1, "ping_interval": 10.0}
                    or {"type": "refused", "message": "..."} and the connection closes
    server -> client   the snapshot: {"type": "update", "kind", "key", "value": {...}} each,
                       then {"type": "status", "in_sync": bool, "reason": str} (the end of
                       the snapshot), then updates and status changes as they happen,
                       and {"type": "ping"} when there is nothing else to send.

A deletion is an update with "value": null. A status not in sync without a reason means the
server's first list is still in progress (a client then reports nothing, as the direct
syncer does); with a reason, the server has lost the API.
"""
from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass

from felix_agent.datastore.convert import ConvertError, from_k8s, to_k8s
from felix_agent.model import KIND_OF, Record, SyncStatus, Update

PROTOCOL_VERSION = 1
DEFAULT_PORT = 5473  # Typha's port: operators' firewall rules already know it
# A frame holds one record (or a status); the biggest a Pod or policy gets is far below
# this. A peer that announces more is not speaking this protocol (an HTTP request's
# "GET " reads as 1.2 GB).
MAX_FRAME = 4 * 2**20
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the message says what."""


def frame(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> dict:
    """The next message; raises asyncio.IncompleteReadError at the end of the stream and
    ProtocolError for a frame that is too big or not a JSON object."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ProtocolError(f"a frame of {n} bytes (at most {MAX_FRAME}): not a tortie-fanout peer")
    body = await reader.readexactly(n)
    try:
        msg = json.loads(body)
    except ValueError:
        raise ProtocolError("a frame that is not JSON: not a tortie-fanout peer") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("a frame without a message type: not a tortie-fanout peer")
    return msg


def hello(node: str) -> bytes:
    return frame({"type": "hello", "version": PROTOCOL_VERSION, "node": node})


def check_hello(msg: dict) -> str:
    """The node name of a valid hello; ProtocolError (with the text the refusal sends)
    otherwise."""
    if msg.get("type") != "hello":
        raise ProtocolError(f"the first message must be a hello, got {msg.get('type')!r}")
    version = msg.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported: this server speaks "
                            f"version {PROTOCOL_VERSION}; run agents and tortie-fanout of the same release")
    node = msg.get("node")
    if not isinstance(node, str) or not node:
        raise ProtocolError("the hello names no node")
    return node


def welcome(ping_interval: float) -> bytes:
    return frame({"type": "welcome", "version": PROTOCOL_VERSION, "ping_interval": ping_interval})


def refused(message: str) -> bytes:
    return frame({"type": "refused", "message": message})


PING = frame({"type": "ping"})


def update_frame(kind: str, key: str, record: Record | None) -> bytes:
    return frame({"type": "update", "kind": kind, "key": key,
                  "value": None if record is None else to_k8s(record)})


def status_frame(status: SyncStatus) -> bytes:
    return frame({"type": "status", "in_sync": status.in_sync, "reason": status.reason})


@dataclass(frozen=True)
class BadRecord:
    """An update whose value does not convert (logged and skipped by the client)."""

    kind: str
    key: str
    why: str


def decode_update(msg: dict) -> Update | BadRecord:
    """The model Update an update message carries. The value is checked as every datastore
    checks its objects (from_k8s), and must be of the kind and key the message names."""
    kind, key, value = msg.get("kind"), msg.get("key"), msg.get("value")
    if not isinstance(kind, str) or not isinstance(key, str):
        raise ProtocolError("an update without kind and key")
    if value is None:
        return Update(kind, key, None)
    try:
        rec = from_k8s(value, kind)
    except ConvertError as e:
        return BadRecord(kind, key, str(e))
    if KIND_OF[type(rec)] != kind or rec.key != key:
        return BadRecord(kind, key, f"holds {KIND_OF[type(rec)]} {rec.key}")
    return Update(kind, key, rec)


def decode_status(msg: dict) -> SyncStatus:
    return SyncStatus(bool(msg.get("in_sync")), str(msg.get("reason") or ""))
