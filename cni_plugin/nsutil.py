"""Network namespace handles, stdlib only.

setns(2) changes the namespace of the calling THREAD only, so `entered()` saves the
thread's own namespace (/proc/thread-self, not /proc/self, which is the main thread's)
and always switches back.  The agent calls the plumbing from worker threads at once;
each one round-trips its own thread and nothing is process-global.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator

from .errors import INVALID_ENV, UNKNOWN_CONTAINER, CNIError

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: which kind of namespace it is
NETNS_RUN_DIR = "/var/run/netns"

_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
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


@contextlib.contextmanager
def entered(target_fd: int) -> Iterator[None]:
    """Run the body with this thread inside the namespace `target_fd`, then return."""
    own = os.open(own_netns_path(), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target_fd)
        try:
            yield
        finally:
            # If this fails the thread would keep running in the pod's namespace: that
            # must never go unnoticed, so the error propagates over any other.
            _setns(own)
    finally:
        os.close(own)


@contextlib.contextmanager
def opened(netns: str | int) -> Iterator[int]:
    """An fd for `netns` (a path, a name, or an fd the caller keeps owning)."""
    if isinstance(netns, int):
        yield netns
        return
    try:
        fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise CNIError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist") from None
        raise CNIError(INVALID_ENV, f"cannot open network namespace {netns}: {e.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)
