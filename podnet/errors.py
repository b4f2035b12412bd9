"""CNI errors: the spec's well-known codes and the exception every part raises.

The binary turns a CNIError into the spec's error JSON on stdout and a non-zero exit;
the agent puts the same code/msg/details into its wire response, so one error travels
unchanged from wherever it happened to the runtime.
"""
from __future__ import annotations

from podnet import jsoncodec as json

# Well-known codes (CNI spec, "Error" section).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50  # STATUS only
PLUGIN_NOT_AVAILABLE_LIMITED = 51  # STATUS only
# tortie's own codes (the spec leaves 100+ to plugins).
DATAPLANE_FAILURE = 100  # netlink/sysctl work failed, or CHECK found the wiring wrong
IPAM_FAILURE = 101  # the IPAM plugin failed without printing a CNI error, or gave a bad result
INTERNAL = 999  # a bug: an unexpected exception (the log has the traceback)


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str) -> str:
        return json.dumps(self.to_dict(cni_version))

    def __repr__(self) -> str:
        return f"CNIError({self.code}, {self.msg!r}, {self.details!r})"
