"""Delegation to a standard IPAM plugin (host-local, static, dhcp...) per the CNI spec:
the plugin is found in CNI_PATH and executed with the same environment and the same
network config on stdin; its result or error comes back on stdout.

One liberty, for plugins built before spec 1.1.0 (Debian's containernetworking-plugins
speak up to 1.0.0): when such a plugin refuses a 1.1.0 config with code 1, ADD/DEL/CHECK
are retried once with cniVersion 1.0.0 — the result format of the two is the same, so
nothing is lost and 1.1.0 configs keep working with the distribution's plugins.
"""
from __future__ import annotations

import fcntl
import os
import select
import sys
import time
from _signal import SIGKILL, SIGPIPE, SIGXFSZ

from podnet import jsoncodec as json
from podnet.netconf import CniEnv, NetConf
from podnet.errors import INCOMPATIBLE_VERSION, INVALID_CONFIG, IPAM_FAILURE, CNIError
from podnet.logsetup import get_logger
from podnet.records import Record
from podnet.result import Result, ResultError

log = get_logger("tortie.cni.ipam")

IPAM_TIMEOUT = 60.0
RETRY_VERSION = "1.0.0"
_READ_SIZE = 32768


class Invocation(Record):
    """One execution of a delegated plugin: what to run it with."""

    __slots__ = ("command", "container_id", "netns", "ifname", "cni_args")

    def __init__(self, command: str, container_id: str = "", netns: str = "", ifname: str = "",
                 cni_args: str = "") -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.cni_args = cni_args


def find_plugin(name: str, cni_path: list[str]) -> str:
    for d in cni_path:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise CNIError(INVALID_CONFIG, f"IPAM plugin {name!r} not found in CNI_PATH",
                   "searched " + (":".join(cni_path) or "(empty CNI_PATH)"))


def _run(path: str, inv: Invocation, cni_path: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    env = dict(os.environ)
    env.update({"CNI_COMMAND": inv.command, "CNI_PATH": ":".join(cni_path)})
    for key, value in (("CNI_CONTAINERID", inv.container_id), ("CNI_NETNS", inv.netns),
                       ("CNI_IFNAME", inv.ifname), ("CNI_ARGS", inv.cni_args)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    if getattr(sys, "frozen", False):
        # The PyInstaller bootloader points LD_LIBRARY_PATH at its bundle; a delegated
        # plugin must see the runtime's environment, not ours.
        orig = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if orig is not None:
            env["LD_LIBRARY_PATH"] = orig
        else:
            env.pop("LD_LIBRARY_PATH", None)
    try:
        return spawn(path, env, stdin, IPAM_TIMEOUT)
    except SpawnTimeout:
        raise CNIError(IPAM_FAILURE, f"IPAM plugin {os.path.basename(path)} {inv.command} did not "
                       f"finish within {IPAM_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise CNIError(IPAM_FAILURE, f"cannot execute IPAM plugin {path}: {e.strerror}") from None


# --- running a plugin without the subprocess module ---------------------------------
# `import subprocess` costs the binary ~4 ms at every start (selectors, signal and enum,
# threading, contextlib...) for one child process.  spawn() does what the binary used of
# subprocess.run([path], input=..., capture_output=True, env=..., timeout=...): the same
# pipes, close_fds, signal dispositions in the child, timeout and return code, with
# os.posix_spawn (vfork+exec in glibc), select.poll and os.waitpid.


class SpawnTimeout(Exception):
    """The child outlived its deadline; it has been killed and reaped."""


def _pipe(opened: list[int]) -> tuple[int, int]:
    r, w = os.pipe()  # both ends close-on-exec (PEP 446): the child only gets its dup2 copies
    opened += (r, w)
    return r, w


def _above_stdio(fd: int, opened: list[int]) -> int:
    """fd itself, or a copy above 2 if it is one of 0-2 (a parent started with a closed
    stdin/stdout/stderr): the child's dup2 onto 0, 1 and 2 must not overwrite a source."""
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    opened.append(new)
    _close(fd, opened)
    return new


def _close(fd: int, opened: list[int]) -> None:
    opened.remove(fd)
    os.close(fd)


def _inheritable_fds() -> list[int]:
    """Descriptors above 2 that exec would hand the child (not close-on-exec): the child
    closes them first, as close_fds=True does.  (Python opens its own close-on-exec; these
    are ones this process itself inherited, or made inheritable on purpose.)"""
    try:
        candidates = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: look at the usual range
        candidates = list(range(3, 1024))
    out = []
    for fd in candidates:
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    out.append(fd)
            except OSError:  # not open (the listing's own descriptor, gone by now)
                pass
    return out


def spawn(path: str, env: dict[str, str], data: bytes, timeout: float) -> tuple[int, bytes, bytes]:
    """Run `path` (argv [path]) with `env`, `data` on its stdin; (return code, stdout,
    stderr), the return code -N when a signal N ended it.  OSError when it cannot be
    executed; SpawnTimeout (after killing it) when it runs longer than `timeout` s."""
    deadline = time.monotonic() + timeout
    opened: list[int] = []
    pid = 0
    try:
        child_in, to_child = _pipe(opened)
        from_out, child_out = _pipe(opened)
        from_err, child_err = _pipe(opened)
        child_in, child_out, child_err = (_above_stdio(fd, opened) for fd in (child_in, child_out, child_err))
        actions = [(os.POSIX_SPAWN_DUP2, child_in, 0), (os.POSIX_SPAWN_DUP2, child_out, 1),
                   (os.POSIX_SPAWN_DUP2, child_err, 2)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()]
        # Python ignores SIGPIPE (and SIGXFSZ); an ignored signal stays ignored across exec,
        # so the child gets the defaults back, as subprocess's restore_signals does.
        pid = os.posix_spawn(path, [path], env, file_actions=actions, setsigdef=(SIGPIPE, SIGXFSZ))
        for fd in (child_in, child_out, child_err):
            _close(fd, opened)  # the child's now: EOF on our ends comes when it closes them
        out, err = _communicate(to_child, from_out, from_err, data, deadline, opened)
        code = _wait(pid, deadline)
        pid = 0
        return code, out, err
    finally:
        if pid:  # timed out or interrupted: the child must not outlive us unreaped
            try:
                os.kill(pid, SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        for fd in opened:
            os.close(fd)


def _communicate(to_child: int, from_out: int, from_err: int, data: bytes, deadline: float,
                 opened: list[int]) -> tuple[bytes, bytes]:
    """Feed `data` and drain both outputs at once (a child blocked writing one pipe while
    we wait on the other would never finish), until both reach EOF."""
    poller = select.poll()
    chunks: dict[int, list[bytes]] = {from_out: [], from_err: []}
    for fd in chunks:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    active = len(chunks)
    view, offset = memoryview(data), 0
    if data:
        poller.register(to_child, select.POLLOUT)
        active += 1
    else:
        _close(to_child, opened)
    while active:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SpawnTimeout()
        for fd, _events in poller.poll(remaining * 1000):
            if fd in chunks:
                block = os.read(fd, _READ_SIZE)
                if block:
                    chunks[fd].append(block)
                    continue
            else:
                try:
                    # POLLOUT promises room for PIPE_BUF bytes: this write does not block.
                    offset += os.write(fd, view[offset:offset + select.PIPE_BUF])
                except BrokenPipeError:
                    offset = len(view)  # it stopped reading; what it read is what it gets
                if offset < len(view):
                    continue
            poller.unregister(fd)  # EOF, or all of stdin written: close it (EOF for the child)
            _close(fd, opened)
            active -= 1
    return b"".join(chunks[from_out]), b"".join(chunks[from_err])


def _wait(pid: int, deadline: float) -> int:
    """Reap the child within the deadline: its exit status, or -N for signal N."""
    wpid, status = os.waitpid(pid, os.WNOHANG)
    if not wpid:
        # Its pipes close an instant before it can be reaped (or it lives on without them):
        # a pidfd turns readable when it exits, so no sleeping in steps as subprocess does.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # a kernel before 5.3
            return _wait_polling(pid, deadline)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise SpawnTimeout()
        finally:
            os.close(pidfd)
        wpid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _wait_polling(pid: int, deadline: float) -> int:
    delay = 0.0005
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            return os.waitstatus_to_exitcode(status)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SpawnTimeout()
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _error_from(name: str, command: str, rc: int, out: bytes, err: bytes) -> CNIError:
    try:
        obj = json.loads(out)
        if isinstance(obj, dict) and isinstance(obj.get("code"), int):
            return CNIError(obj["code"], f"IPAM plugin {name} {command} failed: {obj.get('msg', '')}",
                            str(obj.get("details", "") or ""))
    except (ValueError, UnicodeDecodeError):
        pass
    text = (err or out).decode(errors="replace").strip()[:2000]
    return CNIError(IPAM_FAILURE, f"IPAM plugin {name} {command} exited with status {rc}", text)


def execute(conf: NetConf, inv: Invocation, cni_path: list[str], stdin: bytes | None = None) -> bytes:
    """Run the IPAM plugin named by conf.ipam_type; stdout on success, CNIError otherwise."""
    path = find_plugin(conf.ipam_type, cni_path)
    data = conf.raw_bytes if stdin is None else stdin
    rc, out, err = _run(path, inv, cni_path, data)
    if rc != 0:
        error = _error_from(conf.ipam_type, inv.command, rc, out, err)
        if (error.code == INCOMPATIBLE_VERSION and conf.cni_version == "1.1.0"
                and inv.command in ("ADD", "DEL", "CHECK")):
            log.debug("%s refuses 1.1.0; retrying %s as %s", conf.ipam_type, inv.command, RETRY_VERSION)
            obj = json.loads(data)
            obj["cniVersion"] = RETRY_VERSION
            rc, out, err = _run(path, inv, cni_path, json.dumps(obj).encode())
            if rc == 0:
                return out
            error = _error_from(conf.ipam_type, inv.command, rc, out, err)
        raise error
    return out


def _inv(command: str, env: CniEnv, raw_args: str) -> Invocation:
    return Invocation(command, env.container_id, env.netns, env.ifname, raw_args)


def ipam_add(conf: NetConf, env: CniEnv, raw_args: str) -> Result:
    out = execute(conf, _inv("ADD", env, raw_args), env.path)
    try:
        res = Result.from_dict(json.loads(out), "IPAM result")
    except (ValueError, ResultError) as e:
        # The plugin did allocate; give the address back before reporting.
        _release_quietly(conf, env, raw_args)
        raise CNIError(IPAM_FAILURE, f"IPAM plugin {conf.ipam_type} returned an invalid result: {e}") from None
    if not res.ips:
        _release_quietly(conf, env, raw_args)
        raise CNIError(IPAM_FAILURE, f"IPAM plugin {conf.ipam_type} returned no addresses")
    return res


def ipam_del(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    execute(conf, _inv("DEL", env, raw_args), env.path)


def ipam_check(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    execute(conf, _inv("CHECK", env, raw_args), env.path)


def _release_quietly(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    try:
        ipam_del(conf, env, raw_args)
    except CNIError as e:
        log.error("IPAM DEL after a failed ADD failed too: %s %s", e.msg, e.details)


def supports(conf: NetConf, cni_path: list[str], version: str) -> bool:
    """Whether the IPAM plugin lists `version` in its VERSION answer."""
    path = find_plugin(conf.ipam_type, cni_path)
    rc, out, _err = _run(path, Invocation("VERSION"), cni_path, json.dumps({"cniVersion": version}).encode())
    if rc != 0:
        return False
    try:
        return version in json.loads(out).get("supportedVersions", [])
    except (ValueError, AttributeError):
        return False


def release_attachment(conf: NetConf, cni_path: list[str], container_id: str, ifname: str,
                       cni_args: str = "") -> None:
    """IPAM DEL for an attachment other than the current one (GC of a stale record)."""
    obj = dict(conf.raw)
    obj.pop("cni.dev/valid-attachments", None)
    obj.pop("cni.dev/attachments", None)
    execute(conf, Invocation("DEL", container_id, "", ifname, cni_args), cni_path,
            stdin=json.dumps(obj).encode())
