"""The binary's side of the agent socket (stdlib only: no pyroute2 on this path)."""
from __future__ import annotations

import errno
import logging
import os
import socket

from .agent_protocol import ProtocolError, recv_msg, send_msg
from .errors import TRY_AGAIN_LATER, CNIError

log = logging.getLogger("tortie.cni.agent")


class AgentUnavailable(CNIError):
    """The agent could not be reached or did not answer (nothing was done by it)."""

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(TRY_AGAIN_LATER, msg, details)


def call(socket_path: str, request: dict, fds: tuple[int, ...] = (), timeout: float = 30.0) -> dict:
    """Send one request, return the agent's CNI result dict (may be {}); the agent's own
    errors come back as CNIError with its code, an unreachable agent as code 11."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
            reply, extra = recv_msg(s)
        except socket.timeout:
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
