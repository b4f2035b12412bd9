"""Logging for the plugin: to a file, never to stdout (stdout carries the CNI result).

The binary does not import `logging`: with the modules it drags in (threading, traceback,
string, weakref) it costs ~6 ms at every start, for a handful of lines per run.  Instead
`configure()` opens the log file and every `Logger` call of this run appends one line
to it, in the format the stdlib handler used:
    2024-05-01 10:00:00,123 4711 INFO tortie.cni: ADD c1/eth0 ok in 2.1 ms
The same modules also run inside the agent (the plumbing, the config checks), where
nobody calls configure(): there a Logger hands each call to `logging.getLogger(name)`,
so the agent's handlers, levels and format apply as before.
"""
from __future__ import annotations

import os
import sys
import time

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_NAMES = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR"}

_fd: int | None = None  # the binary's log file (O_APPEND: whole lines, even from parallel runs)
_path: str | None = None
_level = LEVELS["info"]


def configure(path: str, level: str = "info") -> None:
    """Send this process's plugin logs to `path` (its directory is created).  Called once
    per binary run; called again with another path (tests run many configs in one
    process), the file follows the new path."""
    global _fd, _path, _level
    _level = LEVELS.get(level.lower(), LEVELS["info"])
    if _path == path and _fd is not None:
        return
    if _fd is not None and _fd != sys.stderr.fileno():
        os.close(_fd)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        # Still never stdout; stderr is for unstructured output per the spec.
        print(f"tortie: cannot open log file {path}: {e}", file=sys.stderr)
        _fd = sys.stderr.fileno()
    _path = path


def enabled(level: int) -> bool:
    return _fd is not None and level >= _level


class Logger:
    """The part of logging.Logger the plugin uses."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, level: int, msg: str, args: tuple, exc: bool = False) -> None:
        if _fd is None:
            import logging  # inside the agent (or a test): its logging setup decides
            logging.getLogger(self.name).log(level, msg, *args, exc_info=exc, stacklevel=3)
            return
        if level < _level:
            return
        text = msg % args if args else msg
        if exc and sys.exc_info()[0] is not None:
            import traceback  # only on the way to an internal error
            text += "\n" + traceback.format_exc().rstrip()
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        line = f"{stamp},{int(now % 1 * 1000):03d} {os.getpid()} {_NAMES[level]} {self.name}: {text}\n"
        try:
            os.write(_fd, line.encode(errors="replace"))
        except OSError:
            pass  # a full disk must not turn a working ADD into a failure

    def debug(self, msg: str, *args) -> None:
        self._log(10, msg, args)

    def info(self, msg: str, *args) -> None:
        self._log(20, msg, args)

    def warning(self, msg: str, *args) -> None:
        self._log(30, msg, args)

    def error(self, msg: str, *args) -> None:
        self._log(40, msg, args)

    def exception(self, msg: str, *args) -> None:
        self._log(40, msg, args, exc=True)


def get_logger(name: str) -> Logger:
    return Logger(name)
