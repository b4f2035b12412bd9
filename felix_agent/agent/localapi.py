"""The agent's local API server: the Unix socket the CNI binary calls.

An asyncio server on a Unix stream socket (mode 0600: only root may wire pods), one
request per connection in podnet.agent_protocol framing, the pod's netns fd passed with
SCM_RIGHTS.  Each connection is its own task, so requests are served concurrently; the
received fd is closed when the request is done, whatever happened.  What a request does is
the handler's (cni_service.CNIService).

Every request is logged with its steps' times, e.g.
    CNI ADD c1/eth0: ok in 0.031s (recv=0.2ms parse=0.1ms alloc=1.9ms plumbing=6.3ms register=21.8ms)
and observed in tortie_cni_request_seconds, so a slow pod start can be placed at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import stat
import time
from typing import Protocol

from podnet.agent_protocol import DEFAULT_SOCKET, ProtocolError, recv_msg, send_msg
from podnet.errors import DECODE_FAILURE, INTERNAL, TRY_AGAIN_LATER, CNIError

from felix_agent import metrics
from felix_agent.agent.cni_request import AGENT_COMMANDS, CNIRequest, error_response, parse_request
from felix_agent.agent.request_steps import begin_steps, step, steps_text
from felix_agent.tasks import cancelled_from_outside

log = logging.getLogger("tortie.localapi")


class RequestHandler(Protocol):
    async def handle(self, req: CNIRequest, netns_fd: int | None) -> dict:
        """The CNI result (or {}), or raise CNIError."""
        ...


class LocalAPI:
    """`await api.start()` ... `await api.stop()` (or `async with LocalAPI(...)`)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, handler: RequestHandler | None = None, *,
                 io_timeout: float = 10.0, io_workers: int = 16, drain_timeout: float = 60.0):
        if handler is None:
            raise ValueError("LocalAPI needs a handler")
        self.socket_path = socket_path
        self.handler = handler
        self.io_timeout = io_timeout
        self.drain_timeout = drain_timeout
        # Reading/writing a message is blocking socket I/O (recvmsg for SCM_RIGHTS); its own
        # small pool keeps a slow client from holding the plumbing workers.
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix="localapi-io")
        self._sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._accept_task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self.served = 0

    async def start(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.socket_path))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        _remove_stale_socket(self.socket_path)
        # Bind under a temporary name, set the mode, then rename into place: the socket is
        # never reachable at its real path with a wider mode than 0600.
        tmp = f"{self.socket_path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.rename(tmp, self.socket_path)
        except BaseException:
            sock.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        st = os.stat(self.socket_path)
        self._ino = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        self._sock = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("local API listening on %s", self.socket_path)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout), remove the
        socket.  In-flight requests are not cancelled: a half-done ADD would have to be
        rolled back while its plumbing still runs on a worker thread."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            try:
                await self._accept_task
            except asyncio.CancelledError:
                pass
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                st = os.stat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._ino:  # still ours, not a successor's
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self._inflight:
            done, pending = await asyncio.wait(set(self._inflight), timeout=self.drain_timeout)
            if pending:
                log.warning("local API stopped with %d requests still running", len(pending))
        self._io.shutdown(wait=False)

    async def __aenter__(self) -> "LocalAPI":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("local API cannot accept (%s); pausing", e)
                    await asyncio.sleep(0.5)
                    continue
                raise
            task = loop.create_task(self._serve(conn))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        t0 = time.monotonic()
        steps = begin_steps()
        try:
            conn.setblocking(True)
            conn.settimeout(self.io_timeout)
            try:
                with step("recv"):
                    obj, fds = await loop.run_in_executor(self._io, recv_msg, conn)
            except (ProtocolError, OSError) as e:
                log.warning("local API: bad request: %s", e)
                await self._reply(conn, error_response(CNIError(DECODE_FAILURE, f"bad request: {e}")))
                return
            netns_fd = fds[0] if fds else None
            resp = await self._dispatch(obj, netns_fd)
            with step("reply"):
                await self._reply(conn, resp)
            self.served += 1
            took = time.monotonic() - t0
            command = obj.get("command")
            metrics.CNI_REQUESTS.labels(command=str(command) if command in AGENT_COMMANDS else "unknown",
                                        result="ok" if resp.get("ok") else "error").observe(took)
            log.info("CNI %s %s/%s: %s in %.4fs%s", command, obj.get("container_id", ""),
                     obj.get("ifname", ""), "ok" if resp.get("ok") else f"error {resp.get('code')}: {resp.get('msg')}",
                     took, steps_text(steps))
        finally:
            for fd in fds:  # every received fd, used or not
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()

    async def _dispatch(self, obj: dict, netns_fd: int | None) -> dict:
        try:
            with step("parse"):
                req = parse_request(obj, netns_fd)
            result = await self.handler.handle(req, netns_fd)
            return {"ok": True, "result": result}
        except CNIError as e:
            return error_response(e)
        except asyncio.CancelledError:
            if cancelled_from_outside():
                raise  # the agent is stopping
            # Something below (a gRPC call whose channel closed) raised CancelledError into
            # this request: it is a failure of the request, which gets an answer.
            log.error("local API: %s was cancelled from below", obj.get("command"))
            return error_response(CNIError(TRY_AGAIN_LATER, f"{obj.get('command')} failed: an internal call "
                                                            "was cancelled (datastore connection lost?)",
                                           "see the agent's log"))
        except Exception as e:  # noqa: BLE001 - the binary must always get an answer
            log.exception("local API: %s failed unexpectedly", obj.get("command"))
            return error_response(CNIError(INTERNAL, f"internal error: {type(e).__name__}: {e}",
                                           "see the agent's log"))

    async def _reply(self, conn: socket.socket, resp: dict) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, send_msg, conn, resp)
        except OSError as e:
            # The binary gave up (timeout) or died; an ADD it will retry or DEL.
            log.warning("local API: could not send the response: %s", e)


def _remove_stale_socket(path: str) -> None:
    """A socket left by a dead agent is removed; a live one is an error (two agents)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise RuntimeError(f"another agent is serving {path}")
