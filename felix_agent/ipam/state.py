"""The node's IPAM state on disk: its blocks, its allocations and the round-robin cursors.

One JSON file, rewritten whole on every change: written to a temporary file in the same
directory, fsync'd, renamed over the old one, and the directory fsync'd.  A reader (the
agent after a restart, even after kill -9 or a power cut) therefore sees either the old
or the new state, never a torn one, and an address is on disk before it is handed out.

A lock file (flock) keeps a second IPAM instance from using the same directory: two
writers would each hand out addresses the other does not know about.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field

from felix_agent.model import BlockAffinity

from felix_agent.ipam.errors import IPAMError, StateDirInUse

DEFAULT_STATE_DIR = "/var/lib/tortie/ipam"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Allocation:
    """One address handed to one attachment (container id + interface name)."""

    ip: str  # plain address, "10.65.0.5"
    block: str  # "10.65.0.0/26"
    container_id: str
    ifname: str = "eth0"
    namespace: str = ""
    pod: str = ""
    created: float = 0.0  # unix time, for `tortiectl ipam show` and leak reports

    @property
    def attachment(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)


@dataclass
class IPAMState:
    node: str
    blocks: dict[str, BlockAffinity] = field(default_factory=dict)  # cidr -> affinity
    allocations: dict[str, Allocation] = field(default_factory=dict)  # ip -> allocation
    cursors: dict[str, str] = field(default_factory=dict)  # cidr -> last address handed out

    def to_json(self) -> bytes:
        doc = {
            "version": FORMAT_VERSION,
            "node": self.node,
            # vars(), not asdict(): flat records need no deep copy, and this runs on every
            # allocation (a node with 250 pods rewrites 250 records each time).
            "blocks": [vars(b) for b in sorted(self.blocks.values(), key=lambda b: b.cidr)],
            "allocations": [vars(a) for a in sorted(self.allocations.values(), key=lambda a: a.ip)],
            "cursors": dict(sorted(self.cursors.items())),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, path: str = "") -> "IPAMState":
        try:
            doc = json.loads(data)
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {doc.get('version')!r}")
            st = cls(node=doc["node"])
            for b in doc.get("blocks", []):
                aff = BlockAffinity(**b)
                st.blocks[aff.cidr] = aff
            for a in doc.get("allocations", []):
                al = Allocation(**a)
                st.allocations[al.ip] = al
            st.cursors = dict(doc.get("cursors", {}))
            return st
        except (ValueError, KeyError, TypeError) as e:
            # Refuse to start rather than start empty: an empty state would hand out
            # addresses that running pods hold.
            raise IPAMError(f"IPAM state file {path or '?'} is unreadable ({e}); "
                            "fix or move it aside (addresses in it would be handed out twice)") from None


class StateFile:
    """The state directory: lock it, load the state, save it atomically."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR):
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(f"IPAM state dir {self.dir} is in use by another IPAM instance "
                                "(is another agent running on this node?)") from None
        self._lock_fd = fd
        # A crash between write and rename leaves a temporary file; it holds nothing the
        # state file does not (the rename never happened), so it can go.
        for name in os.listdir(self.dir):
            if name.startswith(STATE_FILE + ".tmp."):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def load(self, node: str) -> IPAMState:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return IPAMState(node=node)
        st = IPAMState.from_json(data, self.path)
        if st.node != node:
            raise IPAMError(f"IPAM state file {self.path} belongs to node {st.node!r}, not {node!r}")
        return st

    def save(self, data: bytes) -> None:
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        # The rename itself must reach the disk too, or a crash could bring back the old file.
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
