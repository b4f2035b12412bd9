"""The agent's local API: the Unix socket the CNI binary calls, and the CNI service behind it.

LocalAPI is the transport: an asyncio server on a Unix stream socket (mode 0600: only root
may wire pods), one request per connection in podnet.agent_protocol framing, the pod's
netns fd passed with SCM_RIGHTS.  Each connection is its own task, so requests are served
concurrently; the received fd is closed when the request is done, whatever happened.

CNIService is the handler: ADD / DEL / CHECK / STATUS / GC on top of IPAM, the pod
plumbing (podnet.plumbing, run on a worker thread because setns is per thread) and
the agent's endpoint registry (register returns once the endpoint's policy is
programmed, so a pod never runs unprotected).  Any ADD failure undoes every step.

Every request is logged with its steps' times, e.g.
    CNI ADD c1/eth0: ok in 0.031s (recv=0.2ms parse=0.1ms alloc=1.9ms plumbing=6.3ms register=21.8ms)
and observed in tortie_cni_request_seconds, so a slow pod start can be placed at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from podnet import naming, nsutil, versions
from podnet.agent_protocol import DEFAULT_SOCKET, ProtocolError, recv_msg, send_msg
from podnet.netconf import K8S_ARGS, NetConf, config_from, valid_id, validate_ifname
from podnet.errors import (DATAPLANE_FAILURE, DECODE_FAILURE, INTERNAL, INVALID_CONFIG, INVALID_ENV,
                               IO_FAILURE, IPAM_FAILURE, PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER, CNIError)
from podnet.layout import GATEWAY_V4, GATEWAY_V6, HOST_MAC
from podnet.result import Interface, IPConfig, Result, Route

from felix_agent import metrics
from felix_agent.tasks import cancelled_from_outside
from felix_agent.agent.intents import AddIntent, IntentLog
from felix_agent.ipam import IPAM, Allocation, IPAMConfigError, IPAMError, IPAMExhausted, NoUsablePool
from felix_agent.model import WorkloadEndpoint
from felix_agent.dataplane.retired_links import RetiredLinkReaper

log = logging.getLogger("tortie.localapi")

# Step timings (ms) of the request being served.  Each connection is its own task with its
# own context, so concurrent requests never mix their figures.
_steps: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("cni_steps", default=None)


def record_step(name: str, since: float) -> None:
    """Add the time from `since` (time.monotonic()) to now to the request's step `name`."""
    d = _steps.get()
    if d is not None:
        d[name] = d.get(name, 0.0) + (time.monotonic() - since) * 1000


class step:
    """`with step("alloc"):` adds the block's wall time to the current request's timings."""

    __slots__ = ("name", "t0")

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = 0.0

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc) -> None:
        record_step(self.name, self.t0)


def _steps_text(d: dict[str, float] | None) -> str:
    return f" ({' '.join(f'{k}={v:.1f}ms' for k, v in d.items())})" if d else ""

AGENT_COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC")  # VERSION never leaves the binary
NEEDS_ATTACHMENT = ("ADD", "DEL", "CHECK")
NEEDS_NETNS_FD = ("ADD", "CHECK")


# --- the request -----------------------------------------------------------------------

@dataclass(frozen=True)
class CNIRequest:
    """A validated request from the binary."""

    command: str
    conf: NetConf
    container_id: str = ""
    ifname: str = ""
    netns: str = ""  # the path the runtime gave, for logs and the result's sandbox
    args: dict[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()  # "10.0.0.5/32": addresses from a non-tortie IPAM plugin

    @property
    def namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


def parse_request(obj: dict, netns_fd: int | None) -> CNIRequest:
    """Check a request the way the binary checks its environment and config, so a bad
    request is refused before anything is changed."""
    command = obj.get("command")
    if command not in AGENT_COMMANDS:
        raise CNIError(INVALID_ENV, f"unknown command {command!r}", "expected one of " + ", ".join(AGENT_COMMANDS))
    config = obj.get("config")
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "request has no network config object")
    # The very checks the binary ran: the same fields are required with the same errors
    # (on the decoded object: re-encoding it only to parse it again cost time per pod).
    conf = config_from(config, command)
    if command not in NEEDS_ATTACHMENT:
        return CNIRequest(command=command, conf=conf)

    cid = obj.get("container_id")
    if not isinstance(cid, str) or not cid:
        raise CNIError(INVALID_ENV, f"{command} needs a container id")
    if not valid_id(cid):
        raise CNIError(INVALID_ENV, f"container id {cid!r} is not a valid id",
                       "it must start with a letter or digit, then letters, digits, _ . -")
    ifname = obj.get("ifname")
    if not isinstance(ifname, str):
        raise CNIError(INVALID_ENV, f"{command} needs an interface name")
    validate_ifname(ifname)
    netns = obj.get("netns", "")
    if not isinstance(netns, str):
        raise CNIError(INVALID_ENV, "netns must be a string (the namespace path)")
    raw_args = obj.get("args") or {}
    if not isinstance(raw_args, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in raw_args.items()):
        raise CNIError(INVALID_ENV, "args must be an object of strings")
    args = {k: v for k, v in raw_args.items() if k in K8S_ARGS}
    for k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
        v = args.get(k)
        if v is not None and (len(v) > 253 or not v or any(c.isspace() or not c.isprintable() for c in v)):
            raise CNIError(INVALID_ENV, f"{k}={v!r} is not a Kubernetes name")
    raw_ips = obj.get("ips") or []
    if not isinstance(raw_ips, list):
        raise CNIError(DECODE_FAILURE, "ips must be a list of addresses in CIDR form")
    ips = []
    for ip in raw_ips:
        try:
            if not isinstance(ip, str) or "/" not in ip:
                raise ValueError
            ipaddress.ip_interface(ip)
        except ValueError:
            raise CNIError(DECODE_FAILURE, f"ips: {ip!r} is not an address in CIDR form") from None
        ips.append(ip)
    if command in NEEDS_NETNS_FD:
        if netns_fd is None:
            raise CNIError(INVALID_ENV, f"{command} needs the pod's network namespace (no fd was passed)")
        _check_netns_fd(netns_fd, netns)
    return CNIRequest(command=command, conf=conf, container_id=cid, ifname=ifname, netns=netns,
                      args=args, ips=tuple(ips))


def _check_netns_fd(fd: int, path: str) -> None:
    """The fd must be a network namespace and not the agent's own: wiring "eth0" into the
    node's namespace would take the node off the network."""
    try:
        kind = fcntl.ioctl(fd, nsutil.NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != nsutil.CLONE_NEWNET:
        raise CNIError(INVALID_ENV, f"the fd passed for {path or 'the netns'} is not a network namespace")
    if nsutil.same_namespace(fd, nsutil.own_netns_path()):
        raise CNIError(INVALID_ENV, f"netns {path or '(fd)'} is the agent's own network namespace",
                       "the pod must have a namespace of its own")


def error_response(e: CNIError) -> dict:
    return {"ok": False, "code": e.code, "msg": e.msg, "details": e.details}


# --- the transport ---------------------------------------------------------------------

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
        steps: dict[str, float] = {}
        _steps.set(steps)
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
            log.info("CNI %s %s/%s: %s in %.3fs%s", command, obj.get("container_id", ""),
                     obj.get("ifname", ""), "ok" if resp.get("ok") else f"error {resp.get('code')}: {resp.get('msg')}",
                     took, _steps_text(steps))
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


# --- the CNI service -------------------------------------------------------------------

class EndpointRegistry(Protocol):
    async def register(self, wep: WorkloadEndpoint) -> None:
        """Record the endpoint; return only once its policy is programmed."""
        ...

    async def unregister(self, namespace: str, pod: str) -> None: ...


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str):
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def _k8s_or_default(namespace: str, pod: str, container_id: str) -> tuple[str, str]:
    """Without Kubernetes args (cnitool, a bare runtime) the container id names the
    workload, in namespace "" (podnet.naming names its veth the same way)."""
    if namespace and pod:
        return namespace, pod
    return "", container_id


def _host_mac_of(info: Any) -> tuple[str, str]:
    """(host mac, container mac) from whatever plumbing.setup returned."""
    if not isinstance(info, dict):
        return HOST_MAC, ""
    host = info.get("host_mac") or HOST_MAC
    cont = info.get("container_mac") or info.get("mac") or ""
    return str(host), str(cont)


class CNIService:
    """The local API's handler.  `executor` runs the plumbing (blocking netlink/setns
    work); `plumbing` defaults to the podnet.plumbing module."""

    def __init__(self, ipam: IPAM, registry: EndpointRegistry, node_name: str,
                 executor: concurrent.futures.Executor, *, plumbing: Any = None,
                 register_timeout: float = 30.0, intents: IntentLog | None = None):
        if plumbing is None:
            from podnet import plumbing as _plumbing
            plumbing = _plumbing
        self.ipam = ipam
        self.registry = registry
        self.node = node_name
        self.executor = executor
        self.plumbing = plumbing
        self.register_timeout = register_timeout
        self.intents = intents  # None: no crash recovery (tests of the service alone)
        # host veth -> container id of the sandbox that owns it now.  A pod's veth name
        # depends only on namespace/pod, so a late DEL of a replaced sandbox must not tear
        # down its successor's veth.  After a restart, IPAM's records stand in for this.
        self._owner: dict[str, str] = {}
        # Requests for one host veth run one at a time: a runtime's retried ADD, or a late
        # DEL of an old sandbox racing the ADD of its successor, must not interleave.
        self._veth_locks = KeyedLocks()
        # DEL retires the host veth and a reaper deletes it later (felix_agent/dataplane/retired_links.py);
        # a plumbing without retire() (a test double) tears down synchronously.
        self._retire = getattr(plumbing, "retire", None)
        reap = getattr(plumbing, "reap_retired", None)
        self.reaper = RetiredLinkReaper(reap, executor) if self._retire and reap else None

    async def handle(self, req: CNIRequest, netns_fd: int | None) -> dict:
        if req.command in NEEDS_ATTACHMENT:
            waiting = time.monotonic()
            async with self._veth_locks.hold(self._identity(req)[2]):
                record_step("lock", waiting)
                if req.command == "ADD":
                    return await self.add(req, netns_fd)
                if req.command == "DEL":
                    await self.delete(req)
                    return {}
                await self.check(req, netns_fd)
                return {}
        if req.command == "STATUS":
            self.status(req)
            return {}
        if req.command == "GC":
            await self.gc(req)
            return {}
        raise CNIError(INVALID_ENV, f"unknown command {req.command!r}")

    def _identity(self, req: CNIRequest) -> tuple[str, str, str]:
        """(k8s namespace, pod, host veth) of the attachment.  DEL may come without
        Kubernetes args; IPAM's record of the attachment then names the pod."""
        namespace, pod = req.namespace, req.pod
        if not (namespace and pod):
            allocs = self.ipam.allocations_for(req.container_id, req.ifname)
            if allocs and allocs[0].namespace:
                namespace, pod = allocs[0].namespace, allocs[0].pod
        return namespace, pod, naming.host_iface_for(namespace or None, pod or None, req.container_id, req.ifname)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def _uses_ipam(self, req: CNIRequest) -> bool:
        return not req.ips

    # -- ADD ------------------------------------------------------------------------------

    async def add(self, req: CNIRequest, netns_fd: int | None) -> dict:
        namespace, pod = _k8s_or_default(req.namespace, req.pod, req.container_id)
        host_if = naming.host_iface_for(req.namespace, req.pod, req.container_id, req.ifname)
        if self.intents is None:
            return await self._add(req, netns_fd, namespace, pod, host_if)
        self.intents.begin(AddIntent(req.container_id, req.ifname, req.namespace, req.pod, host_if))
        try:
            return await self._add(req, netns_fd, namespace, pod, host_if)
        finally:  # answered: done or rolled back (a crash before this leaves the intent)
            self.intents.end(req.container_id, req.ifname)

    async def recover_interrupted(self) -> int:
        """Roll back every ADD a crash interrupted (its intent is still on disk): the same
        steps as a DEL (veth, routes, endpoint, address; a veth another sandbox owns by
        now stays).  Runs at start, before the socket serves anything, so no retry of the
        same ADD can race it.  Returns how many were rolled back."""
        if self.intents is None:
            return 0
        n = 0
        for it in self.intents.pending():
            ns, pod = (it.namespace, it.pod) if it.namespace and it.pod else ("", "")
            try:
                await self._detach(it.container_id, it.ifname, ns, pod, it.host_if)
                gone = await self.ipam.release(it.container_id, it.ifname)
            except Exception as e:  # noqa: BLE001 - kept: tried again at the next start
                log.error("could not roll back interrupted ADD %s/%s: %s", it.container_id, it.ifname, e)
                continue
            self.intents.end(it.container_id, it.ifname)
            n += 1
            log.warning("rolled back an ADD a crash interrupted: %s/%s (%s, %s)", it.container_id, it.ifname,
                        it.host_if, ", ".join(a.ip for a in gone) or "no address")
        return n

    async def _add(self, req: CNIRequest, netns_fd: int | None, namespace: str, pod: str, host_if: str) -> dict:
        allocated: Allocation | None = None
        plumbing_tried = registered = False
        if not req.ips and netns_fd is not None:
            # Before allocating or changing anything: the pod's CNI_IFNAME may be another
            # container's (with host-local IPAM the binary, which keeps those records, asks).
            held = await self._run(self.plumbing.occupant, netns_fd, req.ifname)
            if held is not None:
                owner = self._owner_of(held) if held else None
                if owner != req.container_id:
                    raise self.plumbing.taken_error(req.ifname, req.netns, owner)
        try:
            if req.ips:
                cidrs = list(req.ips)
            else:
                with step("alloc"):
                    allocated = await self.ipam.allocate(req.container_id, req.ifname, namespace=namespace, pod=pod)
                cidrs = [_host_cidr(allocated.ip)]
            plumbing_tried = True
            with step("plumbing"):
                info = await self._run(self.plumbing.setup, netns_fd, req.ifname, host_if, cidrs, req.conf.mtu,
                                       req.netns)
            host_mac, cont_mac = _host_mac_of(info)
            wep = WorkloadEndpoint(namespace=namespace, pod=pod, node=self.node, container_id=req.container_id,
                                   iface=host_if, ips=tuple(c.split("/")[0] for c in cidrs), mac=cont_mac)
            registered = True  # before the await: a register that fails half-way is undone too
            with step("register"):
                await asyncio.wait_for(self.registry.register(wep), self.register_timeout)
        except BaseException as e:
            await self._rollback(req, namespace, pod, host_if, allocated, plumbing_tried, registered)
            if isinstance(e, asyncio.CancelledError) and cancelled_from_outside():
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise CNIError(DATAPLANE_FAILURE, f"the endpoint's policy was not programmed within "
                                                  f"{self.register_timeout:.0f}s", "the agent's dataplane is stuck or failing") from None
            raise _as_cni_error(e, "ADD") from None
        self._owner[host_if] = req.container_id
        res = Result(
            interfaces=[Interface(name=host_if, mac=host_mac),
                        Interface(name=req.ifname, mac=cont_mac, sandbox=req.netns)],
            ips=[IPConfig(address=c, interface=1) for c in cidrs],
            routes=_default_routes(cidrs))
        return res.to_dict(versions.LATEST)

    async def _rollback(self, req: CNIRequest, namespace: str, pod: str, host_if: str,
                        allocated: Allocation | None, plumbing_tried: bool, registered: bool) -> None:
        """Undo an ADD's steps, newest first; every step is tried even if one fails."""
        if registered:
            try:
                await self.registry.unregister(namespace, pod)
            except Exception as e:  # noqa: BLE001
                log.error("rollback of %s: unregister failed: %s", req.container_id, e)
        if plumbing_tried:
            try:
                await self._run(self.plumbing.teardown, None, req.ifname, host_if)
            except Exception as e:  # noqa: BLE001
                log.error("rollback of %s: teardown of %s failed: %s", req.container_id, host_if, e)
        if allocated is not None:
            try:
                await self.ipam.release(req.container_id, req.ifname)
            except Exception as e:  # noqa: BLE001 - GC frees it later
                log.error("rollback of %s: releasing %s failed: %s", req.container_id, allocated.ip, e)

    # -- DEL ------------------------------------------------------------------------------

    async def delete(self, req: CNIRequest) -> None:
        """Idempotent: an unknown container, or one already deleted, succeeds."""
        namespace, pod, host_if = self._identity(req)
        await self._detach(req.container_id, req.ifname, namespace, pod, host_if)
        try:
            with step("release"):
                await self.ipam.release(req.container_id, req.ifname)
        except IPAMError as e:
            raise _as_cni_error(e, "DEL") from None

    async def _detach(self, container_id: str, ifname: str, namespace: str, pod: str, host_if: str) -> None:
        owner = self._owner_of(host_if)
        if owner not in (None, container_id):
            log.info("DEL %s: %s now belongs to sandbox %s; leaving it", container_id, host_if, owner)
            return
        try:
            with step("teardown"):
                if self.reaper is not None and await self._run(self._retire, host_if):
                    self.reaper.notify()
                else:  # no host veth left (a repeated DEL), or no reaper: the synchronous path
                    await self._run(self.plumbing.teardown, None, ifname, host_if)
        except Exception as e:  # noqa: BLE001
            raise _as_cni_error(e, "DEL") from None
        wl_ns, wl_pod = _k8s_or_default(namespace, pod, container_id)
        try:
            with step("unregister"):
                await self.registry.unregister(wl_ns, wl_pod)
        except Exception as e:  # noqa: BLE001 - the runtime retries a failed DEL
            raise CNIError(DATAPLANE_FAILURE, f"could not remove endpoint {wl_ns}/{wl_pod}: {e}") from None
        self._owner.pop(host_if, None)

    def _owner_of(self, host_if: str) -> str | None:
        if host_if in self._owner:
            return self._owner[host_if]
        # After a restart: the newest allocation whose attachment names this veth.
        newest: Allocation | None = None
        for a in self.ipam.allocations():
            ns, pod = a.namespace, a.pod
            if naming.host_iface_for(ns if ns else None, pod if ns else None, a.container_id, a.ifname) != host_if:
                continue
            if newest is None or a.created > newest.created:
                newest = a
        return newest.container_id if newest else None

    # -- CHECK ----------------------------------------------------------------------------

    async def check(self, req: CNIRequest, netns_fd: int | None) -> None:
        host_if = naming.host_iface_for(req.namespace, req.pod, req.container_id, req.ifname)
        if req.ips:
            cidrs = list(req.ips)
        else:
            allocs = self.ipam.allocations_for(req.container_id, req.ifname)
            if not allocs:
                raise CNIError(IPAM_FAILURE, f"no address is allocated to {req.container_id}/{req.ifname}",
                               "the attachment was never added here, or was deleted or garbage-collected")
            cidrs = [_host_cidr(a.ip) for a in allocs]
        try:
            await self._run(self.plumbing.check, netns_fd, req.ifname, host_if, cidrs)
        except Exception as e:  # noqa: BLE001
            raise _as_cni_error(e, "CHECK") from None

    # -- STATUS ---------------------------------------------------------------------------

    def status(self, req: CNIRequest) -> None:
        if not req.conf.ipam_is_tortie:
            return  # the binary asks the delegated IPAM plugin itself
        ok, why = self.ipam.status()
        if not ok:
            raise CNIError(PLUGIN_NOT_AVAILABLE, f"tortie IPAM cannot allocate: {why}")

    # -- GC -------------------------------------------------------------------------------

    async def gc(self, req: CNIRequest) -> None:
        valid = req.conf.valid_attachments
        if valid is None:
            raise CNIError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the config")
        # Interfaces go first, addresses after: an address is free only once no veth or
        # route of the old attachment is left that a new pod with it would collide with.
        leaked = self.ipam.unattached(valid)
        errors, freed = [], []
        for a in leaked:
            ns, pod = (a.namespace, a.pod) if a.namespace else ("", "")
            host_if = naming.host_iface_for(ns or None, pod or None, a.container_id, a.ifname)
            try:
                async with self._veth_locks.hold(host_if):
                    await self._detach(a.container_id, a.ifname, ns, pod, host_if)
            except Exception as e:  # noqa: BLE001 - try every one, report at the end
                errors.append(f"{a.container_id}/{a.ifname}: {e}")
                continue
            freed.append(a.ip)
        try:
            await self.ipam.release_ips(freed)
        except IPAMError as e:
            raise _as_cni_error(e, "GC") from None
        if freed:
            log.info("GC freed %d leaked attachments: %s", len(freed), ", ".join(freed))
        if errors:
            raise CNIError(DATAPLANE_FAILURE, f"GC freed {len(freed)} addresses but could not remove "
                                              f"{len(errors)} interfaces", "; ".join(errors))


def _host_cidr(ip: str) -> str:
    return f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}"


def _default_routes(cidrs: list[str]) -> list[Route]:
    routes = []
    fams = {ipaddress.ip_interface(c).version for c in cidrs}
    if 4 in fams:
        routes.append(Route(dst="0.0.0.0/0", gw=GATEWAY_V4))
    if 6 in fams:
        routes.append(Route(dst="::/0", gw=GATEWAY_V6))
    return routes


def _as_cni_error(e: BaseException, command: str) -> CNIError:
    """One place that says which CNI code each failure gets."""
    if isinstance(e, CNIError):
        return e
    if isinstance(e, (IPAMExhausted, NoUsablePool)):
        # 11: the runtime retries later, and a freed address or a new pool can fix it.
        # Both messages name the pool (or the node's podCIDRs) and say "exhausted"/"no pool".
        return CNIError(TRY_AGAIN_LATER, str(e))
    if isinstance(e, IPAMConfigError):
        return CNIError(IPAM_FAILURE, f"IPAM: {e}")
    if isinstance(e, IPAMError):
        return CNIError(IO_FAILURE, f"IPAM state: {e}")
    if isinstance(e, ConnectionError):
        # The datastore (etcd) is unreachable while a block had to be claimed: transient.
        return CNIError(TRY_AGAIN_LATER, f"{command} failed: datastore unavailable: {e}")
    if isinstance(e, OSError):
        return CNIError(DATAPLANE_FAILURE, f"{command} failed: {e}")
    if isinstance(e, asyncio.CancelledError):
        # Not the agent stopping (that re-raises): a call below was cancelled under us.
        return CNIError(TRY_AGAIN_LATER, f"{command} failed: an internal call was cancelled "
                                         "(datastore connection lost?)")
    return CNIError(DATAPLANE_FAILURE, f"{command} failed: {type(e).__name__}: {e}")
