"""Delegation to a standard IPAM plugin (host-local, static, dhcp...) per the CNI spec:
the plugin is found in CNI_PATH and executed with the same environment and the same
network config on stdin; its result or error comes back on stdout.

One liberty, for plugins built before spec 1.1.0 (Debian's containernetworking-plugins
speak up to 1.0.0): when such a plugin refuses a 1.1.0 config with code 1, ADD/DEL/CHECK
are retried once with cniVersion 1.0.0 — the result format of the two is the same, so
nothing is lost and 1.1.0 configs keep working with the distribution's plugins.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from .config import CniEnv, NetConf
from .errors import INCOMPATIBLE_VERSION, INVALID_CONFIG, IPAM_FAILURE, CNIError
from .logsetup import get_logger
from .result import Result, ResultError

log = get_logger("tortie.cni.ipam")

IPAM_TIMEOUT = 60.0
RETRY_VERSION = "1.0.0"


@dataclass
class Invocation:
    """One execution of a delegated plugin: what to run it with."""
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: str = ""


def find_plugin(name: str, cni_path: list[str]) -> str:
    for d in cni_path:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise CNIError(INVALID_CONFIG, f"IPAM plugin {name!r} not found in CNI_PATH",
                   "searched " + (":".join(cni_path) or "(empty CNI_PATH)"))


def _run(path: str, inv: Invocation, cni_path: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    import subprocess  # here: the agent-IPAM path never execs anything
    env = dict(os.environ)
    env.update({"CNI_COMMAND": inv.command, "CNI_PATH": ":".join(cni_path)})
    for key, value in (("CNI_CONTAINERID", inv.container_id), ("CNI_NETNS", inv.netns),
                       ("CNI_IFNAME", inv.ifname), ("CNI_ARGS", inv.cni_args)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    if getattr(sys, "frozen", False):
        # The PyInstaller bootloader points LD_LIBRARY_PATH at its bundle; a delegated
        # plugin must see the runtime's environment, not ours.
        orig = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if orig is not None:
            env["LD_LIBRARY_PATH"] = orig
        else:
            env.pop("LD_LIBRARY_PATH", None)
    try:
        p = subprocess.run([path], input=stdin, capture_output=True, env=env, timeout=IPAM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CNIError(IPAM_FAILURE, f"IPAM plugin {os.path.basename(path)} {inv.command} did not "
                       f"finish within {IPAM_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise CNIError(IPAM_FAILURE, f"cannot execute IPAM plugin {path}: {e.strerror}") from None
    return p.returncode, p.stdout, p.stderr


def _error_from(name: str, command: str, rc: int, out: bytes, err: bytes) -> CNIError:
    try:
        obj = json.loads(out)
        if isinstance(obj, dict) and isinstance(obj.get("code"), int):
            return CNIError(obj["code"], f"IPAM plugin {name} {command} failed: {obj.get('msg', '')}",
                            str(obj.get("details", "") or ""))
    except (ValueError, UnicodeDecodeError):
        pass
    text = (err or out).decode(errors="replace").strip()[:2000]
    return CNIError(IPAM_FAILURE, f"IPAM plugin {name} {command} exited with status {rc}", text)


def execute(conf: NetConf, inv: Invocation, cni_path: list[str], stdin: bytes | None = None) -> bytes:
    """Run the IPAM plugin named by conf.ipam_type; stdout on success, CNIError otherwise."""
    path = find_plugin(conf.ipam_type, cni_path)
    data = conf.raw_bytes if stdin is None else stdin
    rc, out, err = _run(path, inv, cni_path, data)
    if rc != 0:
        error = _error_from(conf.ipam_type, inv.command, rc, out, err)
        if (error.code == INCOMPATIBLE_VERSION and conf.cni_version == "1.1.0"
                and inv.command in ("ADD", "DEL", "CHECK")):
            log.debug("%s refuses 1.1.0; retrying %s as %s", conf.ipam_type, inv.command, RETRY_VERSION)
            obj = json.loads(data)
            obj["cniVersion"] = RETRY_VERSION
            rc, out, err = _run(path, inv, cni_path, json.dumps(obj).encode())
            if rc == 0:
                return out
            error = _error_from(conf.ipam_type, inv.command, rc, out, err)
        raise error
    return out


def _inv(command: str, env: CniEnv, raw_args: str) -> Invocation:
    return Invocation(command, env.container_id, env.netns, env.ifname, raw_args)


def ipam_add(conf: NetConf, env: CniEnv, raw_args: str) -> Result:
    out = execute(conf, _inv("ADD", env, raw_args), env.path)
    try:
        res = Result.from_dict(json.loads(out), "IPAM result")
    except (ValueError, ResultError) as e:
        # The plugin did allocate; give the address back before reporting.
        _release_quietly(conf, env, raw_args)
        raise CNIError(IPAM_FAILURE, f"IPAM plugin {conf.ipam_type} returned an invalid result: {e}") from None
    if not res.ips:
        _release_quietly(conf, env, raw_args)
        raise CNIError(IPAM_FAILURE, f"IPAM plugin {conf.ipam_type} returned no addresses")
    return res


def ipam_del(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    execute(conf, _inv("DEL", env, raw_args), env.path)


def ipam_check(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    execute(conf, _inv("CHECK", env, raw_args), env.path)


def _release_quietly(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    try:
        ipam_del(conf, env, raw_args)
    except CNIError as e:
        log.error("IPAM DEL after a failed ADD failed too: %s %s", e.msg, e.details)


def supports(conf: NetConf, cni_path: list[str], version: str) -> bool:
    """Whether the IPAM plugin lists `version` in its VERSION answer."""
    path = find_plugin(conf.ipam_type, cni_path)
    rc, out, _err = _run(path, Invocation("VERSION"), cni_path, json.dumps({"cniVersion": version}).encode())
    if rc != 0:
        return False
    try:
        return version in json.loads(out).get("supportedVersions", [])
    except (ValueError, AttributeError):
        return False


def release_attachment(conf: NetConf, cni_path: list[str], container_id: str, ifname: str,
                       cni_args: str = "") -> None:
    """IPAM DEL for an attachment other than the current one (GC of a stale record)."""
    obj = dict(conf.raw)
    obj.pop("cni.dev/valid-attachments", None)
    obj.pop("cni.dev/attachments", None)
    execute(conf, Invocation("DEL", container_id, "", ifname, cni_args), cni_path,
            stdin=json.dumps(obj).encode())
