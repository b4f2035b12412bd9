"""Network namespace handles, stdlib only.

setns(2) changes the namespace of the calling THREAD only, so `entered()` saves the
thread's own namespace (/proc/thread-self, not /proc/self, which is the main thread's)
and always switches back.  The agent calls the plumbing from worker threads at once;
each one round-trips its own thread and nothing is process-global.
"""
from __future__ import annotations

import errno
import fcntl
import os

from podnet.errors import INVALID_ENV, UNKNOWN_CONTAINER, CNIError

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: which kind of namespace it is
NETNS_RUN_DIR = "/var/run/netns"

_setns_fn = None


def _load_setns():
    """libc's setns(2) through _ctypes, the C module under the ctypes package.

    Why not `import ctypes`: PyInstaller's bootstrap imports ctypes at EVERY start of the
    bundle when the package is in it (to patch its library loading), ~1.6 ms of each CNI
    call (measured: empty bundle with ctypes 15.7 ms, without 14.2 ms, p50).  The build
    leaves the ctypes package out (deploy/build-cni.sh); these few lines are all of it
    that setns needs."""
    import _ctypes

    class CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class CFunc(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    class Process:  # what CFuncPtr((name, library)) reads: the dlopen handle
        _handle = _ctypes.dlopen(None, 0)  # the running program: libc's symbols included

    return CFunc(("setns", Process())), _ctypes.get_errno


def _setns(fd: int) -> None:
    global _setns_fn
    if _setns_fn is None:
        _setns_fn = _load_setns()
    fn, get_errno = _setns_fn
    if fn(fd, CLONE_NEWNET) != 0:
        err = get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """A bare name means /var/run/netns/<name>, as `ip netns` names them."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def open_netns(path: str) -> int:
    """Open a pod's network namespace for the plumbing; refuses anything that is not a
    network namespace, and the caller's own namespace (wiring eth0 into the node itself
    would take the node off the network)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CNIError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except OSError as e:
        raise CNIError(INVALID_ENV, f"cannot open network namespace {path}: {e.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != CLONE_NEWNET:
            raise CNIError(INVALID_ENV, f"CNI_NETNS {path} is not a network namespace")
        if same_namespace(fd, own_netns_path()):
            raise CNIError(INVALID_ENV, f"CNI_NETNS {path} is the plugin's own network namespace",
                           "the pod must have a namespace of its own")
    except BaseException:
        os.close(fd)
        raise
    return fd


def own_netns_path() -> str:
    return "/proc/thread-self/ns/net"


def same_namespace(fd: int, path: str) -> bool:
    a = os.fstat(fd)
    try:
        b = os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def namespace_exists(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


class entered:
    """`with entered(fd):` runs the body with this thread inside the namespace `target_fd`,
    then returns.  (A class rather than contextlib.contextmanager: the binary does not
    import contextlib on its hot path.)"""

    def __init__(self, target_fd: int) -> None:
        self.target_fd = target_fd
        self.own: int | None = None

    def __enter__(self) -> None:
        self.own = os.open(own_netns_path(), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.target_fd)
        except BaseException:
            os.close(self.own)
            raise

    def __exit__(self, *exc) -> None:
        try:
            # If this fails the thread would keep running in the pod's namespace: that
            # must never go unnoticed, so the error propagates over any other.
            _setns(self.own)  # type: ignore[arg-type]  # set by __enter__
        finally:
            os.close(self.own)  # type: ignore[arg-type]


class opened:
    """`with opened(netns) as fd:` an fd for `netns` (a path, a name, or an fd the caller
    keeps owning)."""

    def __init__(self, netns: str | int) -> None:
        self.netns = netns
        self.fd: int | None = None

    def __enter__(self) -> int:
        if isinstance(self.netns, int):
            return self.netns
        try:
            self.fd = os.open(netns_path(self.netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise CNIError(UNKNOWN_CONTAINER, f"network namespace {self.netns} does not exist") from None
            raise CNIError(INVALID_ENV, f"cannot open network namespace {self.netns}: {e.strerror}") from None
        return self.fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
