"""The binary's record of the attachments it made, one small JSON file each.

GC (CNI 1.1) names only the attachments that are still valid; to clean up the others the
plugin must know what it made.  A record is written BEFORE the IPAM call (an intent),
completed after the plumbing, and removed by DEL or a failed ADD, so an ADD that died
half-way (killed, node crash) still leaves a record for GC to find and undo.
Layout: <state_dir>/<network>/<containerID>@<ifname>.json ('@' cannot occur in a
container id, so the split is unambiguous).
"""
from __future__ import annotations

import os

from podnet import jsoncodec as json
from podnet.errors import IO_FAILURE, CNIError
from podnet.records import Record


class Attachment(Record):
    __slots__ = ("container_id", "ifname", "host_ifname", "netns", "ipam_type", "cni_args", "ips",
                 "complete")

    def __init__(self, container_id: str, ifname: str, host_ifname: str, netns: str = "",
                 ipam_type: str = "", cni_args: str = "", ips: list[str] | None = None,
                 complete: bool = False) -> None:
        self.container_id = container_id
        self.ifname = ifname
        self.host_ifname = host_ifname
        self.netns = netns
        self.ipam_type = ipam_type
        self.cni_args = cni_args  # as received, so GC can give the IPAM plugin the same args
        self.ips = [] if ips is None else ips
        self.complete = complete  # False: ADD started but did not finish

    def to_dict(self) -> dict:
        """The record as written: every field in order (what dataclasses.asdict gave)."""
        return {f: list(self.ips) if f == "ips" else getattr(self, f) for f in self.__slots__}


class AttachmentStore:
    def __init__(self, state_dir: str, network: str) -> None:
        self.dir = os.path.join(state_dir, network)

    def _path(self, container_id: str, ifname: str) -> str:
        return os.path.join(self.dir, f"{container_id}@{ifname}.json")

    def save(self, att: Attachment) -> None:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            path = self._path(att.container_id, att.ifname)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps(att.to_dict()))
            os.replace(tmp, path)
        except OSError as e:
            raise CNIError(IO_FAILURE, f"cannot write attachment record in {self.dir}: {e.strerror}") from None

    def load(self, container_id: str, ifname: str) -> Attachment | None:
        try:
            with open(self._path(container_id, ifname)) as f:
                return Attachment(**json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # a torn or foreign file: treat as absent, GC will not trust it

    def remove(self, container_id: str, ifname: str) -> None:
        try:
            os.unlink(self._path(container_id, ifname))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CNIError(IO_FAILURE, f"cannot remove attachment record: {e.strerror}") from None

    def all(self) -> list[Attachment]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = []
        for n in sorted(names):
            if not n.endswith(".json") or "@" not in n:
                continue
            cid, _, rest = n[:-5].partition("@")
            att = self.load(cid, rest)
            if att is not None:
                out.append(att)
        return out
