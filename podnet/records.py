"""Typed records for the binary's hot path, without `dataclasses`.

`import dataclasses` brings in `inspect`, and with it ast, dis and tokenize: about 8 ms
at every start of the CNI binary, half of ptp's whole ADD.  The records the binary
builds on every call (config, environment, results) get what they used from dataclasses
(keyword construction with defaults, field-wise ==, a readable repr) from __slots__, an
explicit typed __init__ and this base class.  Modules off the hot path keep dataclasses.
"""
from __future__ import annotations


class Record:
    """Fields are the subclass's __slots__, in order."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass without frozen=True

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({fields})"
