"""What the runtime hands the plugin: CNI_* environment variables and the network config.

Both are validated here, before anything is changed, so bad input gets one clear CNI
error and touches nothing.  Stdlib only (this is the binary's hot path).
"""
from __future__ import annotations

from podnet import jsoncodec as json
from podnet import versions
from podnet.agent_protocol import DEFAULT_SOCKET
from podnet.errors import (DECODE_FAILURE, INVALID_CONFIG, INVALID_ENV, UNSUPPORTED_FIELD, CNIError)
from podnet.records import Record
from podnet.result import Result, ResultError

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

# The spec's grammar for container ids and network names: ^[A-Za-z0-9][A-Za-z0-9_.\-]*$
# (checked without `re`, whose import is a noticeable part of the binary's start).
_ID_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ID_CHARS = _ID_FIRST | frozenset("_.-")


def valid_id(s: object) -> bool:
    """A container id or network name as the spec allows them (the agent checks ids too)."""
    return isinstance(s, str) and s[:1] in _ID_FIRST and all(c in _ID_CHARS for c in s)


def __getattr__(name: str):
    if name == "ID_RE":  # the compiled form, for callers that want a pattern
        import re
        return re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
    raise AttributeError(name)
IFNAMSIZ = 16
DEFAULT_MTU = 1500
DEFAULT_LOG_FILE = "/var/log/tortie/cni.log"
DEFAULT_STATE_DIR = "/var/lib/cni/tortie"
DEFAULT_AGENT_TIMEOUT = 30.0
LOG_LEVELS = ("debug", "info", "warning", "error")
TORTIE_IPAM = "tortie"


class CniEnv(Record):
    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")

    def __init__(self, command: str, container_id: str = "", netns: str = "", ifname: str = "",
                 args: dict[str, str] | None = None, path: list[str] | None = None) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = {} if args is None else args  # the known CNI_ARGS keys
        self.path = [] if path is None else path

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
        if not valid_id(env.container_id):
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


class NetConf(Record):
    __slots__ = ("cni_version", "name", "type", "ipam_type", "ipam", "raw", "_raw_bytes", "mtu",
                 "agent_socket", "agent_socket_explicit", "agent_timeout", "log_file_path", "log_level",
                 "state_dir", "prev_result", "valid_attachments", "dns")

    def __init__(self, cni_version: str, name: str, type: str, ipam_type: str, ipam: dict, raw: dict,
                 raw_bytes: bytes | None = None) -> None:
        self.cni_version = cni_version
        self.name = name
        self.type = type
        self.ipam_type = ipam_type
        self.ipam = ipam
        self.raw = raw  # the whole config as received: passed on to IPAM plugins and the agent
        self._raw_bytes = raw_bytes
        self.mtu: int = DEFAULT_MTU
        self.agent_socket: str | None = None  # set when the config names one, or IPAM is tortie
        self.agent_socket_explicit = False
        self.agent_timeout: float = DEFAULT_AGENT_TIMEOUT
        self.log_file_path: str = DEFAULT_LOG_FILE
        self.log_level = "info"
        self.state_dir: str = DEFAULT_STATE_DIR
        self.prev_result: Result | None = None
        self.valid_attachments: list[tuple[str, str]] | None = None  # GC
        self.dns: dict = {}

    @property
    def raw_bytes(self) -> bytes:
        """The config's bytes as received (what a delegated IPAM plugin gets on stdin);
        re-encoded only for a config that arrived as an object (the agent's side)."""
        if self._raw_bytes is None:
            self._raw_bytes = json.dumps(self.raw).encode()
        return self._raw_bytes

    @property
    def uses_agent(self) -> bool:
        return self.agent_socket is not None

    @property
    def ipam_is_tortie(self) -> bool:
        return self.ipam_type == TORTIE_IPAM


def peek_version(data: bytes | dict | None) -> str:
    """The config's cniVersion when it is one we speak (for error output), else latest.
    Takes the raw bytes or the already decoded object (the binary decodes stdin once)."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except Exception:
            return versions.LATEST
    v = data.get("cniVersion") if isinstance(data, dict) else None
    return v if v in versions.SUPPORTED_VERSIONS else versions.LATEST


def try_decode(data: bytes) -> dict | CNIError:
    """stdin decoded once for the whole run: the object, or the error a command that
    needs a config will raise."""
    try:
        return _decode(data)
    except CNIError as e:
        return e


def _decode(data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
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


def parse_version_request(data: bytes, obj: dict | CNIError | None = None) -> str:
    """VERSION's stdin is {"cniVersion": ...}; an empty stdin asks in the latest version.
    `obj`: stdin already decoded by try_decode."""
    if not data.strip():
        return versions.LATEST
    if obj is None:
        obj = _decode(data)
    elif isinstance(obj, CNIError):
        raise obj
    v = obj.get("cniVersion", versions.LATEST)
    if not isinstance(v, str):
        raise CNIError(INVALID_CONFIG, "cniVersion must be a string")
    return v


def parse_config(data: bytes, command: str, obj: dict | CNIError | None = None) -> NetConf:
    """Validate the network config on stdin.  `obj`: stdin already decoded (try_decode)."""
    if obj is None:
        obj = _decode(data)
    elif isinstance(obj, CNIError):
        raise obj
    return config_from(obj, command, data)


def config_from(obj: dict, command: str, data: bytes | None = None) -> NetConf:
    """The checks of parse_config on a decoded config (the agent receives it decoded)."""
    version = obj.get("cniVersion")
    if version is None:
        raise CNIError(INVALID_CONFIG, "cniVersion is missing from the network config")
    if not isinstance(version, str):
        raise CNIError(INVALID_CONFIG, f"cniVersion must be a string, got {version!r}")
    versions.require_supported(version)
    name = obj.get("name")
    if not valid_id(name):
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
    if not valid_id(name):
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
