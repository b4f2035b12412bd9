"""What every datastore backend (Syncer) promises, and the bookkeeping they share.

A Syncer turns a datastore (etcd, or the Kubernetes API) into model events:

    async def run(self, emit: Callable[[Event], None]) -> None

`run` goes on until it is cancelled. It emits `model.Update` for every record created or
changed (value set) or deleted (value None) and `model.SyncStatus`:

- SyncStatus(True) once the initial list has been delivered completely;
- SyncStatus(False, reason) when the datastore connection is lost; the syncer keeps
  retrying with backoff, and records already delivered stay valid meanwhile;
- after reconnecting it relists and emits only the difference against what the consumer
  already has (Updates for new/changed records, deletions for records that vanished while
  it was away), then SyncStatus(True) again.

Objects that fail to convert are logged and skipped; they never stop the syncer.

`EmittedState` is that difference engine, shared by both backends so they emit identical
event sequences for identical histories.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol

from felix_agent import model
from felix_agent.datastore.convert import ConvertError, from_k8s
from felix_agent.model import Event, Record, SyncStatus, Update

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
RecordId = tuple[str, str]  # (kind, record.key)

_KIND_ORDER = {k: i for i, k in enumerate(model.KINDS)}


class Syncer(Protocol):
    async def run(self, emit: Emit) -> None:
        """Deliver model events until cancelled (see the module docstring)."""
        ...


@dataclass
class Backoff:
    """Exponential backoff with jitter, so many agents do not hammer a datastore that has
    just come back all at the same moment."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0
    _current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._current = self.initial if not self._current else min(self._current * self.factor,
                                                                    self.maximum)
        return self._current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._current = 0.0


def record_id(record: Record) -> RecordId:
    return (model.KIND_OF[type(record)], record.key)


def convert_or_log(obj: dict, kind: str | None = None, source: str = "") -> Record | None:
    """from_k8s, but a bad object is logged (with where it came from) and gives None."""
    try:
        return from_k8s(obj, kind)
    except ConvertError as e:
        log.warning("skipping invalid object%s: %s", f" at {source}" if source else "", e)
        return None


class EmittedState:
    """What the consumer has been told, so that nothing is emitted twice and a relist
    emits exactly the difference.

    All methods run on the event loop that owns the syncer (never from threads)."""

    def __init__(self, emit: Emit):
        self._emit = emit
        self.records: dict[RecordId, Record] = {}
        self.in_sync = False
        self._status_reason: str | None = None  # last SyncStatus(False) reason sent

    def update(self, rid: RecordId, record: Record | None) -> bool:
        """Emit an Update if `record` differs from what was last emitted for `rid`."""
        old = self.records.get(rid)
        if record is None:
            if old is None:
                return False
            del self.records[rid]
        else:
            if old == record:
                return False
            self.records[rid] = record
        self._emit(Update(kind=rid[0], key=rid[1], value=record))
        return True

    def put(self, record: Record) -> bool:
        return self.update(record_id(record), record)

    def replace(self, snapshot: Mapping[RecordId, Record], kinds: Iterable[str] | None = None) -> int:
        """Make the emitted state equal `snapshot` for the given kinds (all when None):
        changed and new records first, in model.KINDS order (namespaces before pods),
        then deletions in the reverse order. Returns how many events were emitted."""
        scope = set(kinds) if kinds is not None else None
        n = 0
        for rid in sorted(snapshot, key=lambda r: (_KIND_ORDER.get(r[0], 99), r[1])):
            if scope is None or rid[0] in scope:
                n += self.update(rid, snapshot[rid])
        gone = [rid for rid in self.records
                if rid not in snapshot and (scope is None or rid[0] in scope)]
        for rid in sorted(gone, key=lambda r: (-_KIND_ORDER.get(r[0], 99), r[1])):
            n += self.update(rid, None)
        return n

    def set_in_sync(self, in_sync: bool, reason: str = "") -> None:
        """Emit SyncStatus on transitions only: one False per outage, however many retries."""
        if in_sync:
            if not self.in_sync:
                self.in_sync = True
                self._status_reason = None
                self._emit(SyncStatus(True))
        elif self.in_sync or self._status_reason is None:
            self.in_sync = False
            self._status_reason = reason
            self._emit(SyncStatus(False, reason))

    def keys(self, kind: str) -> list[str]:
        return [k for (kd, k) in self.records if kd == kind]
