"""The request the CNI binary sends over the local API, validated: parse_request checks a
message the way the binary checks its environment and config, so a bad request is refused
before anything is changed."""
from __future__ import annotations

import fcntl
import ipaddress
from dataclasses import dataclass, field

from podnet import nsutil
from podnet.errors import DECODE_FAILURE, INVALID_ENV, CNIError
from podnet.netconf import K8S_ARGS, NetConf, config_from, valid_id, validate_ifname

AGENT_COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC")  # VERSION never leaves the binary
NEEDS_ATTACHMENT = ("ADD", "DEL", "CHECK")
NEEDS_NETNS_FD = ("ADD", "CHECK")


@dataclass(frozen=True)
class CNIRequest:
    """A validated request from the binary."""

    command: str
    conf: NetConf
    container_id: str = ""
    ifname: str = ""
    netns: str = ""  # the path the runtime gave, for logs and the result's sandbox
    args: dict[str, str] = field(default_factory=dict)
    ips: tuple[str, ...] = ()  # "10.0.0.5/32": addresses from a non-tortie IPAM plugin

    @property
    def namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


def parse_request(obj: dict, netns_fd: int | None) -> CNIRequest:
    """Check a request the way the binary checks its environment and config, so a bad
    request is refused before anything is changed."""
    command = obj.get("command")
    if command not in AGENT_COMMANDS:
        raise CNIError(INVALID_ENV, f"unknown command {command!r}", "expected one of " + ", ".join(AGENT_COMMANDS))
    config = obj.get("config")
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "request has no network config object")
    # The very checks the binary ran: the same fields are required with the same errors
    # (on the decoded object: re-encoding it only to parse it again cost time per pod).
    conf = config_from(config, command)
    if command not in NEEDS_ATTACHMENT:
        return CNIRequest(command=command, conf=conf)

    cid = obj.get("container_id")
    if not isinstance(cid, str) or not cid:
        raise CNIError(INVALID_ENV, f"{command} needs a container id")
    if not valid_id(cid):
        raise CNIError(INVALID_ENV, f"container id {cid!r} is not a valid id",
                       "it must start with a letter or digit, then letters, digits, _ . -")
    ifname = obj.get("ifname")
    if not isinstance(ifname, str):
        raise CNIError(INVALID_ENV, f"{command} needs an interface name")
    validate_ifname(ifname)
    netns = obj.get("netns", "")
    if not isinstance(netns, str):
        raise CNIError(INVALID_ENV, "netns must be a string (the namespace path)")
    raw_args = obj.get("args") or {}
    if not isinstance(raw_args, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in raw_args.items()):
        raise CNIError(INVALID_ENV, "args must be an object of strings")
    args = {k: v for k, v in raw_args.items() if k in K8S_ARGS}
    for k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
        v = args.get(k)
        if v is not None and (len(v) > 253 or not v or any(c.isspace() or not c.isprintable() for c in v)):
            raise CNIError(INVALID_ENV, f"{k}={v!r} is not a Kubernetes name")
    raw_ips = obj.get("ips") or []
    if not isinstance(raw_ips, list):
        raise CNIError(DECODE_FAILURE, "ips must be a list of addresses in CIDR form")
    ips = []
    for ip in raw_ips:
        try:
            if not isinstance(ip, str) or "/" not in ip:
                raise ValueError
            ipaddress.ip_interface(ip)
        except ValueError:
            raise CNIError(DECODE_FAILURE, f"ips: {ip!r} is not an address in CIDR form") from None
        ips.append(ip)
    if command in NEEDS_NETNS_FD:
        if netns_fd is None:
            raise CNIError(INVALID_ENV, f"{command} needs the pod's network namespace (no fd was passed)")
        _check_netns_fd(netns_fd, netns)
    return CNIRequest(command=command, conf=conf, container_id=cid, ifname=ifname, netns=netns,
                      args=args, ips=tuple(ips))


def _check_netns_fd(fd: int, path: str) -> None:
    """The fd must be a network namespace and not the agent's own: wiring "eth0" into the
    node's namespace would take the node off the network."""
    try:
        kind = fcntl.ioctl(fd, nsutil.NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != nsutil.CLONE_NEWNET:
        raise CNIError(INVALID_ENV, f"the fd passed for {path or 'the netns'} is not a network namespace")
    if nsutil.same_namespace(fd, nsutil.own_netns_path()):
        raise CNIError(INVALID_ENV, f"netns {path or '(fd)'} is the agent's own network namespace",
                       "the pod must have a namespace of its own")


def error_response(e: CNIError) -> dict:
    return {"ok": False, "code": e.code, "msg": e.msg, "details": e.details}
