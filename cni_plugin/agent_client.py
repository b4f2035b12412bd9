"""The binary's side of the agent socket (stdlib only: no pyroute2 on this path).

Uses `_socket` directly (see agent_protocol): the binary starts anew for every CNI call,
and socket.py's import is pure start-up cost here.
"""
from __future__ import annotations

import errno
import os
import time
from _socket import AF_UNIX, SOCK_CLOEXEC, SOCK_STREAM
from _socket import socket as _sock

from podnet.agent_protocol import ProtocolError, recv_msg, send_msg
from podnet.errors import TRY_AGAIN_LATER, CNIError

# CLOCK_MONOTONIC stamps of the last call (the binary's debug "timing" line).
last_sent = 0.0
last_reply = 0.0


class AgentUnavailable(CNIError):
    """The agent could not be reached or did not answer (nothing was done by it)."""

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(TRY_AGAIN_LATER, msg, details)


def call(socket_path: str, request: dict, fds: tuple[int, ...] = (), timeout: float = 30.0) -> dict:
    """Send one request, return the agent's CNI result dict (may be {}); the agent's own
    errors come back as CNIError with its code, an unreachable agent as code 11."""
    global last_sent, last_reply
    s = _sock(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(socket_path)
        except OSError as e:
            why = {errno.ENOENT: "does not exist", errno.ECONNREFUSED: "refuses connections"}.get(
                e.errno, e.strerror or str(e))
            raise AgentUnavailable(f"tortie agent is not reachable: {socket_path} {why}",
                                   "is the tortie-agent running on this node?") from None
        try:
            send_msg(s, request, fds)
            last_sent = time.monotonic()
            reply, extra = recv_msg(s)
            last_reply = time.monotonic()
        except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
            raise AgentUnavailable(f"tortie agent did not answer {request.get('command')} "
                                   f"within {timeout:.0f}s") from None
        except (OSError, ProtocolError) as e:
            raise AgentUnavailable(f"tortie agent connection failed: {e}") from None
        for fd in extra:
            os.close(fd)
    finally:
        s.close()
    if reply.get("ok") is True:
        result = reply.get("result", {})
        return result if isinstance(result, dict) else {}
    code = reply.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        code = TRY_AGAIN_LATER
    raise CNIError(code, str(reply.get("msg") or "tortie agent refused the request"),
                   str(reply.get("details") or ""))
