"""ADD intents: a small file per ADD in progress, written before the ADD changes anything
and removed when it has answered (success, or failure after its rollback).  A file that is
still there when the agent starts belongs to an ADD that a crash (kill -9) cut short: the
agent rolls it back, as it would on failure, before it serves any request.

Written without fsync on purpose: they protect against the process dying, and the page
cache outlives a process; a machine crash takes the veths with it anyway (and CNI GC
frees addresses then).  That keeps the ADD's cost to two small file operations.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger("tortie.intents")


@dataclass(frozen=True)
class AddIntent:
    container_id: str
    ifname: str
    namespace: str  # Kubernetes namespace ("" without Kubernetes args)
    pod: str
    host_if: str


class IntentLog:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, container_id: str, ifname: str) -> str:
        # Both are validated by the request parser: no '/', no leading '.'.
        return os.path.join(self.directory, f"{container_id}.{ifname}.json")

    def begin(self, intent: AddIntent) -> None:
        path = self._path(intent.container_id, intent.ifname)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(asdict(intent)).encode())
        finally:
            os.close(fd)

    def end(self, container_id: str, ifname: str) -> None:
        try:
            os.unlink(self._path(container_id, ifname))
        except FileNotFoundError:
            pass

    def pending(self) -> list[AddIntent]:
        """Intents left by ADDs that never answered (read at start-up)."""
        out = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            try:
                with open(path) as f:
                    out.append(AddIntent(**json.load(f)))
            except (OSError, ValueError, TypeError) as e:
                log.warning("dropping unreadable ADD intent %s: %s", path, e)
                try:
                    os.unlink(path)
                except OSError:
                    pass
        return out
