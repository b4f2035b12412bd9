"""What the runtime hands the plugin: CNI_* environment variables and the network config.

Both are validated here, before anything is changed, so bad input gets one clear CNI
error and touches nothing.  Stdlib only (this is the binary's hot path).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from . import versions
from .agent_protocol import DEFAULT_SOCKET
from .errors import (DECODE_FAILURE, INVALID_CONFIG, INVALID_ENV, UNSUPPORTED_FIELD, CNIError)
from .result import Result, ResultError

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# Which variables each command needs (the spec's "Parameters" table).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
K8S_ARGS = ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")

# The spec's grammar for container ids and network names.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
ID_RE = _ID_RE  # public name for other parts (the agent's local API validates ids too)
IFNAMSIZ = 16
DEFAULT_MTU = 1500
DEFAULT_LOG_FILE = "/var/log/tortie/cni.log"
DEFAULT_STATE_DIR = "/var/lib/cni/tortie"
DEFAULT_AGENT_TIMEOUT = 30.0
LOG_LEVELS = ("debug", "info", "warning", "error")
TORTIE_IPAM = "tortie"


@dataclass
class CniEnv:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)  # the known CNI_ARGS keys
    path: list[str] = field(default_factory=list)

    @property
    def k8s_namespace(self) -> str | None:
        return self.args.get("K8S_POD_NAMESPACE") or None

    @property
    def k8s_pod(self) -> str | None:
        return self.args.get("K8S_POD_NAME") or None


def validate_ifname(name: str) -> None:
    """The kernel's rules for an interface name (what `ip link` would refuse)."""
    if not name:
        raise CNIError(INVALID_ENV, "CNI_IFNAME is empty")
    if len(name.encode()) >= IFNAMSIZ:
        raise CNIError(INVALID_ENV, f"CNI_IFNAME {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if name in (".", ".."):
        raise CNIError(INVALID_ENV, f"CNI_IFNAME {name!r} is not a valid interface name")
    for ch in name:
        if ch in "/:" or ch.isspace() or not ch.isprintable():
            raise CNIError(INVALID_ENV, f"CNI_IFNAME {name!r} contains {ch!r}, "
                           "which is not allowed in an interface name")


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS "K=V;K2=V2".  Unknown keys are an error unless IgnoreUnknown is true, as in
    libcni (kubelet and containerd always send IgnoreUnknown=1)."""
    pairs: dict[str, str] = {}
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        pairs[key] = value
    ignore = pairs.pop("IgnoreUnknown", "false").lower()
    if ignore not in ("1", "true", "0", "false"):
        raise CNIError(INVALID_ENV, f"CNI_ARGS: IgnoreUnknown={ignore!r} is not a boolean")
    known = {k: v for k, v in pairs.items() if k in K8S_ARGS}
    unknown = sorted(set(pairs) - set(K8S_ARGS))
    if unknown and ignore in ("0", "false"):
        raise CNIError(INVALID_ENV, "CNI_ARGS: unknown keys " + ", ".join(unknown),
                       "set IgnoreUnknown=1 to ignore them")
    for k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
        v = known.get(k)
        if v is not None and (len(v) > 253 or any(c.isspace() or not c.isprintable() for c in v)):
            raise CNIError(INVALID_ENV, f"CNI_ARGS: {k}={v!r} is not a Kubernetes name")
    return known


def parse_env(environ: dict[str, str]) -> CniEnv:
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(INVALID_ENV, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CNIError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}",
                       "expected one of " + ", ".join(COMMANDS))
    missing = [v for v in REQUIRED_ENV[command] if not environ.get(v)]
    if missing:
        raise CNIError(INVALID_ENV, f"{command} needs {', '.join(missing)} in the environment")
    env = CniEnv(command=command)
    if command in ("ADD", "DEL", "CHECK"):
        env.container_id = environ["CNI_CONTAINERID"]
        if not _ID_RE.match(env.container_id):
            raise CNIError(INVALID_ENV, f"CNI_CONTAINERID {env.container_id!r} is not a valid id",
                           "it must start with a letter or digit, then letters, digits, _ . -")
        env.ifname = environ["CNI_IFNAME"]
        validate_ifname(env.ifname)
        env.netns = environ.get("CNI_NETNS", "")
        if env.netns and not env.netns.startswith("/"):
            raise CNIError(INVALID_ENV, f"CNI_NETNS {env.netns!r} is not an absolute path")
        env.args = parse_cni_args(environ.get("CNI_ARGS", ""))
    env.path = [p for p in environ.get("CNI_PATH", "").split(":") if p]
    return env


@dataclass
class NetConf:
    cni_version: str
    name: str
    type: str
    ipam_type: str
    ipam: dict
    raw: dict  # the whole config as received: passed on to IPAM plugins and the agent
    raw_bytes: bytes
    mtu: int = DEFAULT_MTU
    agent_socket: str | None = None  # set when the config names one, or IPAM is tortie
    agent_socket_explicit: bool = False
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT
    log_file_path: str = DEFAULT_LOG_FILE
    log_level: str = "info"
    state_dir: str = DEFAULT_STATE_DIR
    prev_result: Result | None = None
    valid_attachments: list[tuple[str, str]] | None = None  # GC
    dns: dict = field(default_factory=dict)

    @property
    def uses_agent(self) -> bool:
        return self.agent_socket is not None

    @property
    def ipam_is_tortie(self) -> bool:
        return self.ipam_type == TORTIE_IPAM


def peek_version(data: bytes) -> str:
    """The config's cniVersion when it is one we speak (for error output), else latest."""
    try:
        v = json.loads(data).get("cniVersion")
    except Exception:
        return versions.LATEST
    return v if v in versions.SUPPORTED_VERSIONS else versions.LATEST


def _decode(data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CNIError(DECODE_FAILURE, "network config on stdin is not valid JSON", str(e)) from None
    if not isinstance(obj, dict):
        raise CNIError(DECODE_FAILURE, "network config on stdin is not a JSON object")
    return obj


def _opt_str(obj: dict, key: str, default: str | None) -> str | None:
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, str) or not v:
        raise CNIError(INVALID_CONFIG, f"{key} must be a non-empty string, got {v!r}")
    return v


def parse_version_request(data: bytes) -> str:
    """VERSION's stdin is {"cniVersion": ...}; an empty stdin asks in the latest version."""
    if not data.strip():
        return versions.LATEST
    obj = _decode(data)
    v = obj.get("cniVersion", versions.LATEST)
    if not isinstance(v, str):
        raise CNIError(INVALID_CONFIG, "cniVersion must be a string")
    return v


def parse_config(data: bytes, command: str) -> NetConf:
    obj = _decode(data)
    version = obj.get("cniVersion")
    if version is None:
        raise CNIError(INVALID_CONFIG, "cniVersion is missing from the network config")
    if not isinstance(version, str):
        raise CNIError(INVALID_CONFIG, f"cniVersion must be a string, got {version!r}")
    versions.require_supported(version)
    name = obj.get("name")
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise CNIError(INVALID_CONFIG, f"network name {name!r} is missing or not valid",
                       "it must start with a letter or digit, then letters, digits, _ . -")
    ptype = obj.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise CNIError(INVALID_CONFIG, "type (the plugin name) is missing from the network config")
    ipam = obj.get("ipam")
    if not isinstance(ipam, dict):
        raise CNIError(INVALID_CONFIG, "ipam must be an object with a type; tortie always needs IPAM")
    ipam_type = ipam.get("type")
    if not isinstance(ipam_type, str) or not ipam_type:
        raise CNIError(INVALID_CONFIG, "ipam.type is missing")
    if "/" in ipam_type or ipam_type in (".", ".."):
        raise CNIError(INVALID_CONFIG, f"ipam.type {ipam_type!r} must be a plugin name, not a path")
    if obj.get("ipMasq") is True:
        # Masquerade belongs to the agent (an IP pool's natOutgoing), not to the plugin.
        raise CNIError(UNSUPPORTED_FIELD, "unsupported field ipMasq=true",
                       "tortie does not masquerade in the plugin; set natOutgoing on the IP pool")

    conf = NetConf(cni_version=version, name=name, type=ptype, ipam_type=ipam_type, ipam=ipam,
                   raw=obj, raw_bytes=data)
    mtu = obj.get("mtu", DEFAULT_MTU)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise CNIError(INVALID_CONFIG, f"mtu must be an integer from 68 to 65535, got {mtu!r}")
    conf.mtu = mtu
    conf.log_file_path = _opt_str(obj, "log_file_path", DEFAULT_LOG_FILE)
    level = obj.get("log_level", "info")
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise CNIError(INVALID_CONFIG, f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    conf.log_level = level.lower()
    conf.state_dir = _opt_str(obj, "state_dir", DEFAULT_STATE_DIR)
    explicit = _opt_str(obj, "agent_socket", None)
    conf.agent_socket_explicit = explicit is not None
    conf.agent_socket = explicit or (DEFAULT_SOCKET if ipam_type == TORTIE_IPAM else None)
    timeout = obj.get("agent_timeout", DEFAULT_AGENT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise CNIError(INVALID_CONFIG, f"agent_timeout must be seconds in (0, 3600], got {timeout!r}")
    conf.agent_timeout = float(timeout)
    dns = obj.get("dns", {})
    if not isinstance(dns, dict):
        raise CNIError(INVALID_CONFIG, "dns must be an object")
    conf.dns = dns
    for key in ("args", "runtimeConfig"):
        if key in obj and not isinstance(obj[key], dict):
            raise CNIError(INVALID_CONFIG, f"{key} must be an object")

    if "prevResult" in obj and obj["prevResult"] is not None:
        try:
            conf.prev_result = Result.from_dict(obj["prevResult"], "prevResult")
        except ResultError as e:
            raise CNIError(INVALID_CONFIG, f"prevResult is not a valid CNI result: {e}") from None
    if command == "GC":
        conf.valid_attachments = _valid_attachments(obj)
    return conf


def _valid_attachments(obj: dict) -> list[tuple[str, str]]:
    # libcni sends both spellings (the spec's first draft said cni.dev/attachments).
    key = "cni.dev/valid-attachments" if "cni.dev/valid-attachments" in obj else "cni.dev/attachments"
    raw = obj.get(key, [])
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise CNIError(INVALID_CONFIG, f"{key} must be a list")
    out = []
    for i, a in enumerate(raw):
        if (not isinstance(a, dict) or not isinstance(a.get("containerID"), str)
                or not isinstance(a.get("ifname"), str)):
            raise CNIError(INVALID_CONFIG, f"{key}[{i}] must be {{containerID: str, ifname: str}}")
        out.append((a["containerID"], a["ifname"]))
    return out


def validate_conflist(data: bytes) -> list[str]:
    """Check a network configuration list as a runtime would load it, with tortie's own
    rules for every tortie member (the same parse_config an ADD runs).  Returns the names
    of the plugins in order; raises CNIError naming what is wrong."""
    obj = _decode(data)
    version = obj.get("cniVersion")
    if not isinstance(version, str):
        raise CNIError(INVALID_CONFIG, "conflist: cniVersion is missing or not a string")
    versions.require_supported(version)
    name = obj.get("name")
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise CNIError(INVALID_CONFIG, f"conflist: network name {name!r} is missing or not valid")
    plugins = obj.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIError(INVALID_CONFIG, "conflist: plugins must be a non-empty list")
    types = []
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise CNIError(INVALID_CONFIG, f"conflist: plugins[{i}] has no type")
        if p["type"] == "tortie":
            member = dict(p, cniVersion=version, name=name)
            try:
                parse_config(json.dumps(member).encode(), "ADD")
            except CNIError as e:
                raise CNIError(e.code, f"conflist: plugins[{i}] (tortie): {e.msg}", e.details) from None
        types.append(p["type"])
    if "tortie" not in types:
        raise CNIError(INVALID_CONFIG, "conflist: no plugin of type tortie")
    return types
