"""Logging for the binary: to a file, never to stdout (stdout carries the CNI result)."""
from __future__ import annotations

import logging
import os
import sys

_handler: logging.Handler | None = None
_path: str | None = None


def configure(path: str, level: str = "info") -> None:
    """Send the "tortie" loggers to `path` (its directory is created).  Called once per
    binary run; called again with another path (tests run many configs in one process),
    the handler follows the new path."""
    global _handler, _path
    root = logging.getLogger("tortie")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
    if _path == path and _handler is not None:
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError as e:
        # Still never stdout; stderr is for unstructured output per the spec.
        print(f"tortie: cannot open log file {path}: {e}", file=sys.stderr)
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    _handler, _path = handler, path
