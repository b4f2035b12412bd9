"""How a model record is stored in etcd: its key (layout in keys.py) and its value, the
Kubernetes-shaped JSON, compact with sorted keys so equal records are equal bytes; and the
checks a stored value passes before it counts as a record."""
from __future__ import annotations

import json
import logging

from felix_agent import model
from felix_agent.datastore import keys
from felix_agent.datastore.convert import ConvertError, from_k8s, to_k8s
from felix_agent.model import Record

log = logging.getLogger("felix_agent.datastore.etcd")


def record_name(record: Record) -> tuple[str, str, str]:
    """(kind, name, namespace) as keys.object_key wants them."""
    kind = model.KIND_OF[type(record)]
    if kind in keys.NAMESPACED:
        return kind, record.name, record.namespace
    return kind, record.key, ""  # WorkloadEndpoint: node/ns/pod; BlockAffinity: the cidr


def record_key(prefix: str, record: Record) -> str:
    kind, name, ns = record_name(record)
    return keys.object_key(prefix, kind, name, ns)


def encode_record(record: Record) -> bytes:
    """The stored form of a record: its Kubernetes-shaped JSON, compact with sorted keys, so
    equal records are equal bytes (what delete_if_value compares)."""
    return json.dumps(to_k8s(record), sort_keys=True, separators=(",", ":")).encode()


def decode(key: str, value: bytes, kind: str) -> Record | None:
    """The record a key holds, or None (logged) when it holds none (see decode_checked)."""
    rec = decode_checked(key, value, kind)
    if isinstance(rec, str):
        log.warning("skipping %s: %s", key, rec)
        return None
    return rec


def decode_checked(key: str, value: bytes, kind: str) -> Record | str:
    """The record a key holds, or why it holds none: the value is not valid JSON, does not
    convert, or belongs under a different key (which would break deletions)."""
    try:
        obj = json.loads(value)
    except ValueError as e:
        return f"not JSON ({e})"
    try:
        rec = from_k8s(obj, kind)
    except ConvertError as e:
        return f"invalid object: {e}"
    if model.KIND_OF[type(rec)] != kind:
        return f"holds a {model.KIND_OF[type(rec)]}, not a {kind}"
    prefix = key[: key.index("/" + keys.PLURAL[kind] + "/")]
    if record_key(prefix, rec) != key:
        return f"the object inside belongs at {record_key(prefix, rec)}"
    return rec
