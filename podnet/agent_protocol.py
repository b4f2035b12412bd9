"""The wire protocol between the CNI binary and the node agent (stdlib only).

One request and one response per connection on a Unix stream socket.  Each message is a
4-byte big-endian length followed by that many bytes of UTF-8 JSON.  A request may carry
open file descriptors (the pod's netns) as SCM_RIGHTS ancillary data on its first bytes.

Request  {"command": "ADD"|"DEL"|"CHECK"|"STATUS"|"GC", "container_id": str, "ifname": str,
          "netns": str (the path, for logs), "args": {K8S_POD_NAMESPACE: ..., ...},
          "config": {the network config as the binary received it},
          "ips": [optional: "10.0.0.5/32", ... when the binary ran a non-tortie IPAM plugin]}
          + for ADD/CHECK the open netns fd.
Response {"ok": true, "result": {a CNI 1.1.0 result, or {} for DEL/GC/STATUS}}
       | {"ok": false, "code": int (CNI error code), "msg": str, "details": str}
"""
from __future__ import annotations

import os
import sys
# The C module under `socket`: socket.py turns every constant into an IntEnum at import,
# ~2 ms of the binary's start.  The functions below need only sendmsg/recvmsg/sendall of
# _socket.socket, which socket.socket subclasses, so the agent passes its sockets as they are.
import _socket
from _socket import CMSG_SPACE, SCM_RIGHTS, SOL_SOCKET

from podnet import jsoncodec as json

MAX_MESSAGE = 4 * 1024 * 1024
MAX_FDS = 4
_INT = 4  # sizeof(int): SCM_RIGHTS carries C ints (`array` would import collections.abc)
DEFAULT_SOCKET = "/var/run/tortie/agent.sock"


class ProtocolError(Exception):
    pass


def send_msg(sock: _socket.socket, obj: dict, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE} limit")
    payload = len(data).to_bytes(4, "big") + data
    if fds:
        anc = [(SOL_SOCKET, SCM_RIGHTS, b"".join(fd.to_bytes(_INT, sys.byteorder, signed=True) for fd in fds))]
        sent = sock.sendmsg([payload], anc)
        if sent < len(payload):
            sock.sendall(payload[sent:])
    else:
        sock.sendall(payload)


def recv_msg(sock: _socket.socket) -> tuple[dict, list[int]]:
    """Read one message; returns (object, received fds). The caller owns the fds."""
    fds: list[int] = []
    buf = b""
    need = 4
    header_done = False
    while len(buf) < need:
        chunk, anc, _flags, _addr = sock.recvmsg(
            need - len(buf), CMSG_SPACE(MAX_FDS * _INT))
        for level, kind, cdata in anc:
            if level == SOL_SOCKET and kind == SCM_RIGHTS:
                fds.extend(int.from_bytes(cdata[i:i + _INT], sys.byteorder, signed=True)
                           for i in range(0, len(cdata) - len(cdata) % _INT, _INT))
        if not chunk:
            for fd in fds:
                _close(fd)
            raise ProtocolError("connection closed before a whole message arrived")
        buf += chunk
        if not header_done and len(buf) >= 4:
            length = int.from_bytes(buf[:4], "big")
            if length > MAX_MESSAGE:
                for fd in fds:
                    _close(fd)
                raise ProtocolError(f"message of {length} bytes is over the {MAX_MESSAGE} limit")
            need = 4 + length
            header_done = True
    try:
        obj = json.loads(buf[4:].decode())
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        for fd in fds:
            _close(fd)
        raise ProtocolError(f"message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        for fd in fds:
            _close(fd)
        raise ProtocolError("message is not a JSON object")
    return obj, fds


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
