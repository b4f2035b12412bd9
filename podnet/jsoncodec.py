"""JSON for the binary's hot path, on `_json`, the C scanner and encoder that the `json`
package itself runs on.

`import json` costs ~12 ms CPU at every start of the PyInstaller binary, nearly as much
as the whole bootloader and interpreter: json.decoder builds regular expressions, so
`re`, `enum` and what they import are unpacked from the archive and executed, for a
config of a few hundred bytes.  `_json` does the actual work in both cases; this module
only supplies the small Python shell around it.  Results are the same as json.loads /
json.dumps with default arguments (ensure_ascii, ", " and ": " separators, NaN allowed),
and malformed input raises json.JSONDecodeError (only failures import json.decoder).
"""
from __future__ import annotations

import _json

_WS = " \t\n\r"  # JSON's whitespace


class _ScanContext:
    """The attributes _json.make_scanner reads (those of json.JSONDecoder's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


_scan = _json.make_scanner(_ScanContext())


def _error(msg: str, doc: str, pos: int) -> ValueError:
    from json import JSONDecodeError  # only on the way to a decode error
    return JSONDecodeError(msg, doc, pos)


def loads(data: bytes | bytearray | str) -> object:
    """json.loads for UTF-8 bytes (with or without a BOM) or str.  Raises
    UnicodeDecodeError or json.JSONDecodeError (a ValueError), like json.loads.  (Unlike
    json.loads, bytes in UTF-16/32 are not guessed at: CNI configs are UTF-8.)"""
    s = data.decode("utf-8-sig") if isinstance(data, (bytes, bytearray)) else data
    if not isinstance(s, str):
        raise TypeError(f"the JSON object must be str or bytes, not {type(data).__name__}")
    if s.startswith("\ufeff"):
        raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)", s, 0)
    start = len(s) - len(s.lstrip(_WS))
    try:
        obj, end = _scan(s, start)
    except StopIteration as e:
        raise _error("Expecting value", s, e.value) from None
    except SystemError:
        # The C scanner raises its syntax errors as json.decoder.JSONDecodeError, which it
        # looks up in sys.modules without importing it; absent, it fails with SystemError.
        # Import it and scan again: the same input now fails with the proper error.
        import json.decoder  # noqa: F401
        obj, end = _scan(s, start)
    if s[end:].strip(_WS):
        raise _error("Extra data", s, end + len(s[end:]) - len(s[end:].lstrip(_WS)))
    return obj


def _unserializable(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def dumps(obj: object, separators: tuple[str, str] = (", ", ": ")) -> str:
    """json.dumps(obj) or json.dumps(obj, separators=(item, key)), nothing else."""
    if isinstance(obj, str):
        return _json.encode_basestring_ascii(obj)
    # A fresh markers dict per call detects circular references, as json.dumps does.
    encode = _json.make_encoder({}, _unserializable, _json.encode_basestring_ascii, None,
                                separators[1], separators[0], False, False, True)
    return "".join(encode(obj, 0))
