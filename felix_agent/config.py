"""Agent configuration: defaults < optional file (YAML or JSON) < TORTIE_* environment < flags.

Every key is one field of AgentConfig; its metadata is the --help text.  A bad key or value
anywhere exits with a message that names the key and where it came from.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    pass


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ConfigError naming `what` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{what}: {text.strip()!r} is not host:port (port 1-65535)")
    return host, int(port)


def _f(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class AgentConfig:
    node_name: str = _f("", "this node's name in the datastore (default: the hostname)")
    datastore: str = _f("etcd", "where the cluster state lives", ("etcd", "kubernetes"))
    etcd_endpoints: str = _f("127.0.0.1:2379", "etcd client endpoint host:port, http://host:port or "
                             "https://host:port (TLS) (etcd datastore)")
    etcd_prefix: str = _f("/tortie", "key prefix of every tortie object in etcd")
    kubeconfig: str = _f("", "kubeconfig path (kubernetes datastore; empty: in-cluster config)")
    fanout_endpoints: str = _f("", "tortie-fanout servers, host:port[,host:port...] (kubernetes datastore): "
                                   "take the cluster from them instead of watching the API (empty: watch "
                                   "the API)")
    socket_path: str = _f("/var/run/tortie/agent.sock", "Unix socket the CNI binary talks to")
    state_dir: str = _f("/var/lib/tortie", "persistent state (IPAM allocations)")
    run_dir: str = _f("/var/run/tortie", "runtime files (bird.conf, bird control socket)")
    iptables_backend: str = _f("auto", "iptables backend; auto picks the one holding the node's rules",
                               ("auto", "nft", "legacy"))
    wl_to_host_action: str = _f("ACCEPT", "what happens to pod traffic to the host after egress policy",
                                ("ACCEPT", "DROP"))
    resync_interval: float = _f(10.0, "seconds between full reconciles that repair drift")
    http_host: str = _f("127.0.0.1", "address of the /livez, /readyz and /metrics server")
    http_port: int = _f(9099, "port of the /livez, /readyz and /metrics server (0: off)")
    log_level: str = _f("info", "log level", ("debug", "info", "warning", "error"))
    node_ip: str = _f("", "this node's IPv4 address with prefix (default: the uplink's address)")
    node_ip6: str = _f("", "this node's IPv6 address with prefix (default: the uplink's first global IPv6 "
                           "address, if any)")
    uplink: str = _f("", "the node's uplink interface (default: the interface of the default route)")
    as_number: int = _f(0, "this node's BGP AS number (0: the cluster default 64512)")
    bird: bool = _f(True, "run BIRD for pools in bgp/ipip mode")
    bird_bin: str = _f("bird", "the bird daemon executable")
    birdc_bin: str = _f("birdc", "the birdc client executable")
    mtu: int = _f(1500, "pod interface MTU when the CNI config gives none")
    default_pool: str = _f("", "create this pool (CIDR; dual-stack: an IPv4 and an IPv6 CIDR, comma-separated) "
                               "if the datastore has no pool (etcd mode)")
    default_pool_mode: str = _f("bgp", "routing mode of the default pool", ("bgp", "direct", "vxlan", "ipip"))
    register_node: bool = _f(True, "publish this node's address, AS and VTEP on its Node record (etcd mode)")
    etcd_ca_file: str = _f("", "CA certificate (PEM) that signed etcd's server certificate; needed with an "
                               "https:// etcd endpoint")
    etcd_cert_file: str = _f("", "client certificate (PEM) for etcd's client-cert auth (with etcd_key_file)")
    etcd_key_file: str = _f("", "private key (PEM) of etcd_cert_file")
    bgp_password_file: str = _f("", "file holding the TCP MD5 password of the node-to-node BGP sessions "
                                    "(mesh / route reflectors); every node needs the same")
    liveness_timeout: float = _f(0.0, "seconds the event loop, the dataplane worker (with work pending) or the "
                                      "datastore watcher may go without progress before /livez fails "
                                      "(0: max(60, 6 x resync_interval))")
    ensure_forwarding: bool = _f(True, "set net.ipv4.ip_forward=1 in the node's namespace, as Felix does "
                                 "(off: only check it; either way /readyz says when it is 0)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        if self.resync_interval <= 0:
            raise ConfigError(f"resync_interval: must be > 0, got {self.resync_interval}")
        if self.liveness_timeout < 0:
            raise ConfigError(f"liveness_timeout: must be >= 0, got {self.liveness_timeout}")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port: {self.http_port} is not a port")
        if not 68 <= self.mtu <= 65535:
            raise ConfigError(f"mtu: {self.mtu} is out of range 68-65535")
        if self.node_ip:
            try:
                ipaddress.IPv4Interface(self.node_ip)
            except ValueError:
                raise ConfigError(f"node_ip: {self.node_ip!r} is not an IPv4 address/prefix") from None
        if self.node_ip6:
            try:
                ipaddress.IPv6Interface(self.node_ip6)
            except ValueError:
                raise ConfigError(f"node_ip6: {self.node_ip6!r} is not an IPv6 address/prefix") from None
        if self.default_pool:
            self.default_pools  # raises ConfigError for a bad list
        host, _, port = self.etcd_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"etcd_endpoints: {self.etcd_endpoints!r} is not host:port, http://host:port "
                              "or https://host:port")
        if self.etcd_tls and not self.etcd_ca_file:
            raise ConfigError(f"etcd_ca_file: an https:// etcd endpoint ({self.etcd_endpoints}) needs the CA "
                              "that signed etcd's server certificate")
        if not self.etcd_tls and (self.etcd_ca_file or self.etcd_cert_file or self.etcd_key_file):
            raise ConfigError(f"etcd_endpoints: {self.etcd_endpoints!r} is plaintext but TLS files are set; "
                              "write it as https://host:port")
        if self.bgp_password_file and not self.bgp_password_file.startswith("/"):
            raise ConfigError(f"bgp_password_file: {self.bgp_password_file!r} must be an absolute path")
        if bool(self.etcd_cert_file) != bool(self.etcd_key_file):
            raise ConfigError("etcd_cert_file, etcd_key_file: set both or neither")
        if self.fanout_endpoints.strip():
            if self.datastore != "kubernetes":
                raise ConfigError(f"fanout_endpoints: tortie-fanout serves the kubernetes datastore; "
                                  f"datastore is {self.datastore!r}")
            self.fanout_addresses  # parses them, so a bad one fails here

    @property
    def fanout_addresses(self) -> list[tuple[str, int]]:
        """fanout_endpoints as (host, port) pairs."""
        return [parse_host_port(ep, "fanout_endpoints") for ep in self.fanout_endpoints.split(",")]

    @property
    def default_pools(self) -> list[tuple[str, str]]:
        """default_pool as (pool name, CIDR) pairs: "default-pool" for the IPv4 CIDR,
        "default-pool-v6" for the IPv6 one (a dual-stack cluster names both)."""
        out: dict[int, tuple[str, str]] = {}
        for c in (x.strip() for x in self.default_pool.split(",") if x.strip()):
            try:
                net = ipaddress.ip_network(c)
            except ValueError:
                raise ConfigError(f"default_pool: {c!r} is not a CIDR") from None
            if net.version in out:
                raise ConfigError(f"default_pool: two IPv{net.version} CIDRs; give at most one of each family")
            if net.version == 6 and self.default_pool_mode == "ipip":
                raise ConfigError("default_pool: ipip carries IPv4 only; an IPv6 pool takes bgp, direct or vxlan")
            out[net.version] = ("default-pool" if net.version == 4 else "default-pool-v6", str(net))
        return [out[v] for v in sorted(out)]

    @property
    def etcd_tls(self) -> bool:
        """TLS to etcd: the endpoint is an https:// URL."""
        return self.etcd_endpoints.strip().startswith("https://")

    @property
    def etcd_endpoint(self) -> str:
        """The first endpoint without its scheme: host:port."""
        ep = self.etcd_endpoints.split(",")[0].strip()
        return ep.split("://", 1)[1].rstrip("/") if "://" in ep else ep

    @property
    def etcd_host(self) -> str:
        return self.etcd_endpoint.rpartition(":")[0].strip("[]")

    @property
    def etcd_port(self) -> int:
        return int(self.etcd_endpoint.rpartition(":")[2])

    @property
    def name(self) -> str:
        return self.node_name or socket.gethostname()


FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    f = FIELDS[key]
    kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} ({source}): {value!r} is not a boolean")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} ({source}): {value!r} is not a {kind.__name__}") from None


def load_file(path: str) -> dict[str, Any]:
    try:
        text = open(path).read()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    import yaml  # the agent has PyYAML; JSON is YAML too

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of keys to values")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS:
            raise ConfigError(f"{k} (config file {path}): unknown key; known keys: {', '.join(FIELDS)}")
        out[key] = _coerce(key, v, f"config file {path}")
    return out


# What the kubelet puts in every pod of a namespace for each Service there (docker-style
# links): the tortie-fanout Service in the agent's namespace gives TORTIE_FANOUT_SERVICE_HOST,
# TORTIE_FANOUT_PORT_5473_TCP_ADDR, ...; they are not agent settings.
_SERVICE_LINK = re.compile(r"TORTIE_\w+?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)")


def load_env(environ: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, value in environ.items():
        if not name.startswith("TORTIE_") or name == "TORTIE_CONFIG" or name == "TORTIE_PYTHON":
            continue
        key = name[len("TORTIE_"):].lower()
        if key not in FIELDS and _SERVICE_LINK.fullmatch(name):
            continue
        if key not in FIELDS:
            raise ConfigError(f"{name} (environment): unknown key; known keys: "
                              + ", ".join("TORTIE_" + k.upper() for k in FIELDS))
        out[key] = _coerce(key, value, f"environment {name}")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tortie-agent",
        description="The tortie node agent. Every option can also come from the environment "
                    "(TORTIE_<OPTION>, e.g. TORTIE_NODE_NAME) or from a YAML/JSON file given with "
                    "--config or TORTIE_CONFIG (keys as below, with underscores). "
                    "Precedence: flags > environment > file > defaults.")
    ap.add_argument("--config", help="YAML or JSON config file")
    for f in dataclasses.fields(AgentConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + f" (default: {f.default!r})"
        if f.metadata.get("choices"):
            help_text += f"; one of {', '.join(f.metadata['choices'])}"
        ap.add_argument(flag, dest=f.name, default=None, help=help_text, metavar=f.name.upper())
    return ap


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    environ = dict(os.environ if environ is None else environ)
    args = parser().parse_args(argv)
    values: dict[str, Any] = {}
    path = args.config or environ.get("TORTIE_CONFIG")
    if path:
        values.update(load_file(path))
    values.update(load_env(environ))
    for key in FIELDS:
        v = getattr(args, key)
        if v is not None:
            values[key] = _coerce(key, v, f"flag --{key.replace('_', '-')}")
    try:
        return AgentConfig(**values)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - all keys are checked above
        raise ConfigError(str(e)) from None
