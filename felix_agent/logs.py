"""Structured agent logs: one line per event on stderr, `ts level logger msg key=value ...`."""
from __future__ import annotations

import logging
import sys
import time


class KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [ts, record.levelname.lower(), record.name, record.getMessage()]
        for k, v in getattr(record, "kv", {}).items():
            text = str(v)
            parts.append(f"{k}={text!r}" if (" " in text or not text) else f"{k}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KVFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("grpc", "asyncio", "urllib3", "kubernetes", "pyroute2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def kv(**fields) -> dict:
    """logger.info("msg", extra=kv(a=1)) attaches key=value pairs to the line."""
    return {"kv": fields}
