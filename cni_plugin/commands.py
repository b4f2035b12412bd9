"""The six CNI commands.  Each takes the validated config and environment and returns
what goes to stdout (a Result, a dict, or None), or raises CNIError.

Who does what:
  ipam.type tortie       -> the agent allocates and wires; the binary only forwards
                            (with the pod's netns fd).
  other ipam + agent     -> the binary runs the IPAM plugin, then sends the addresses
     ("agent_socket" set)   ("ips") to the agent, which wires and programs the endpoint.
  other ipam, no agent   -> the binary runs the IPAM plugin and the plumbing itself.
The plumbing module (netlink) is imported only on that last path; the IPAM delegation,
the attachment records and the veth naming only where a command needs them.  Every path
stays off the heavy stdlib (json, subprocess, hashlib, ipaddress, dataclasses: see
tests/unit/test_cni_hotpath.py), as the binary is a new process for every pod.
"""
from __future__ import annotations

import os

from cni_plugin import agent_client

from podnet import nsutil, versions
from podnet.netconf import CniEnv, NetConf
from podnet.errors import (INVALID_CONFIG, IPAM_FAILURE, PLUGIN_NOT_AVAILABLE, CNIError)
from podnet.layout import GATEWAY_V4, GATEWAY_V6, HOST_MAC
from podnet.logsetup import get_logger
from podnet.result import DNS, Interface, IPConfig, Result, ResultError, Route, parse_interface

log = get_logger("tortie.cni")


def _host_ifname(env: CniEnv) -> str:
    from podnet import naming
    return naming.host_iface_for(env.k8s_namespace, env.k8s_pod, env.container_id, env.ifname)


def _request(command: str, conf: NetConf, env: CniEnv, ips: list[str] | None = None) -> dict:
    req = {"command": command, "container_id": env.container_id, "ifname": env.ifname,
           "netns": env.netns, "args": dict(env.args), "config": conf.raw}
    if ips is not None:
        req["ips"] = ips
    return req


def _agent(conf: NetConf, req: dict, fds: tuple[int, ...] = ()) -> dict:
    assert conf.agent_socket is not None
    return agent_client.call(conf.agent_socket, req, fds, conf.agent_timeout)


def _agent_result(raw: dict) -> Result:
    try:
        return Result.from_dict(raw, "agent result")
    except ResultError as e:
        raise CNIError(IPAM_FAILURE, f"tortie agent returned an invalid result: {e}") from None


def pod_addresses(res: Result) -> list[str]:
    """IPAM addresses as the pod gets them: host routes, so /32 and /128 whatever the
    IPAM subnet says."""
    out = []
    for i in res.ips:
        ifc = parse_interface(i.address)  # validated on the way in: never raises here
        out.append(f"{ifc.ip}/{32 if ifc.version == 4 else 128}")
    return out


def build_result(conf: NetConf, env: CniEnv, info: dict, ips: list[str], ipam_dns: DNS) -> Result:
    host = Interface(name=info["host_ifname"], mac=info.get("host_mac", HOST_MAC))
    pod = Interface(name=env.ifname, mac=info.get("container_mac", ""), sandbox=env.netns, mtu=conf.mtu)
    res = Result(interfaces=[host, pod], ips=[IPConfig(address=a, interface=1) for a in ips])
    if any(":" not in a for a in ips):
        res.routes.append(Route(dst="0.0.0.0/0", gw=GATEWAY_V4))
    if any(":" in a for a in ips):
        res.routes.append(Route(dst="::/0", gw=GATEWAY_V6))
    res.dns = ipam_dns if not ipam_dns.is_empty() else DNS.from_dict(conf.dns)
    return res


# --- ADD ------------------------------------------------------------------------------

def cmd_add(conf: NetConf, env: CniEnv, raw_args: str) -> Result:
    nsfd = nsutil.open_netns(env.netns)
    try:
        if conf.ipam_is_tortie:
            res = _agent_result(_agent(conf, _request("ADD", conf, env), (nsfd,)))
        else:
            res = _add_with_ipam_plugin(conf, env, raw_args, nsfd)
    finally:
        os.close(nsfd)
    return res.merged_after(conf.prev_result)


def _add_with_ipam_plugin(conf: NetConf, env: CniEnv, raw_args: str, nsfd: int) -> Result:
    from cni_plugin import ipam_exec
    from cni_plugin.attachments import Attachment, AttachmentStore
    store = AttachmentStore(conf.state_dir, conf.name)
    prior = _refuse_taken_ifname(env, nsfd, store)  # before the record, IPAM or any change
    att = Attachment(env.container_id, env.ifname, _host_ifname(env), env.netns, conf.ipam_type, raw_args)
    store.save(att)  # the intent first: GC can undo an ADD that dies half-way
    allocated = False
    plumbing = None  # set once the veth exists (the module is imported only then)
    try:
        ipam_res = ipam_exec.ipam_add(conf, env, raw_args)
        allocated = True
        ips = pod_addresses(ipam_res)
        if conf.uses_agent:
            res = _agent_result(_agent(conf, _request("ADD", conf, env, ips), (nsfd,)))
        else:
            from podnet import plumbing as wiring
            info = wiring.setup(nsfd, env.ifname, att.host_ifname, ips, conf.mtu, sandbox=env.netns)
            plumbing = wiring  # setup() undoes itself when it fails; after this, we undo
            res = build_result(conf, env, info, ips, ipam_res.dns)
        att.ips, att.complete = ips, True
        store.save(att)
        return res
    except BaseException as e:
        log.error("ADD %s/%s failed, undoing: %s", env.container_id, env.ifname,
                  e.msg if isinstance(e, CNIError) else repr(e))
        if plumbing is not None:
            _quietly(lambda: plumbing.teardown(None, env.ifname, att.host_ifname), "teardown")
        if allocated:
            _quietly(lambda: ipam_exec.ipam_del(conf, env, raw_args), "IPAM DEL")
        if prior is not None:  # a repeated ADD that failed: the live attachment keeps its record
            _quietly(lambda: store.save(prior), "record restore")
        else:
            _quietly(lambda: store.remove(env.container_id, env.ifname), "record removal")
        raise


def _refuse_taken_ifname(env: CniEnv, nsfd: int, store):
    """CNI_IFNAME already exists in the pod's namespace: a repeated ADD of the container
    that made it goes on as always (setup() re-wires it; its record is returned, so a
    failure can put it back); anyone else's is refused here, so the existing pod keeps its
    interface, address, routes and reservation."""
    from podnet import plumbing
    held = plumbing.occupant(nsfd, env.ifname)
    if held is None:
        return None
    mine = store.load(env.container_id, env.ifname)
    if held and mine is not None and mine.host_ifname == held:
        return mine
    owner = next((a.container_id for a in store.all() if held and a.host_ifname == held), None)
    raise plumbing.taken_error(env.ifname, env.netns, owner)


def _claimed_by_another(store, env: CniEnv, host_ifname: str):
    """The attachment record of another container that holds `host_ifname`, or this
    netns's CNI_IFNAME: a DEL without a record of its own must leave those alone."""
    for a in store.all():
        if a.container_id != env.container_id and (
                a.host_ifname == host_ifname or (env.netns and a.netns == env.netns and a.ifname == env.ifname)):
            return a
    return None


def _quietly(fn, what: str) -> None:
    try:
        fn()
    except Exception as e:  # the original error is the one the runtime must see
        log.error("%s during undo failed: %s", what, e)


# --- DEL ------------------------------------------------------------------------------

def cmd_del(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    if conf.ipam_is_tortie:
        _agent(conf, _request("DEL", conf, env))
        return
    from cni_plugin import ipam_exec
    from cni_plugin.attachments import AttachmentStore
    store = AttachmentStore(conf.state_dir, conf.name)
    rec = store.load(env.container_id, env.ifname)
    host_ifname = rec.host_ifname if rec else _host_ifname(env)
    other = None if rec else _claimed_by_another(store, env, host_ifname)
    if other is not None:  # e.g. the DEL of an ADD that was refused for that reason
        log.info("DEL %s/%s: %s belongs to container %s; leaving it", env.container_id, env.ifname,
                 host_ifname, other.container_id)
    elif conf.uses_agent:
        _agent(conf, _request("DEL", conf, env, rec.ips if rec else []))
    elif _host_iface_exists(host_ifname) or (env.netns and nsutil.namespace_exists(env.netns)):
        from podnet import plumbing
        plumbing.teardown(env.netns or None, env.ifname, host_ifname)
    ipam_exec.ipam_del(conf, env, raw_args)
    store.remove(env.container_id, env.ifname)


def _host_iface_exists(name: str) -> bool:
    # if_nametoindex asks the calling thread's namespace (the node's), stdlib only.
    from _socket import if_nametoindex
    try:
        if_nametoindex(name)
        return True
    except OSError:
        return False


# --- CHECK ----------------------------------------------------------------------------

def cmd_check(conf: NetConf, env: CniEnv, raw_args: str) -> None:
    versions.require_at_least(conf.cni_version, "0.4.0", "CHECK")
    if conf.prev_result is None:
        raise CNIError(INVALID_CONFIG, "CHECK needs prevResult (the result of the ADD)")
    ips = pod_addresses(Result(ips=conf.prev_result.sandbox_ips(env.ifname)))
    if not ips:
        raise CNIError(INVALID_CONFIG, f"prevResult has no addresses for interface {env.ifname}")
    nsfd = nsutil.open_netns(env.netns)
    try:
        if conf.ipam_is_tortie:
            _agent(conf, _request("CHECK", conf, env), (nsfd,))
            return
        from cni_plugin import ipam_exec
        from cni_plugin.attachments import AttachmentStore
        ipam_exec.ipam_check(conf, env, raw_args)
        if conf.uses_agent:
            _agent(conf, _request("CHECK", conf, env, ips), (nsfd,))
            return
        rec = AttachmentStore(conf.state_dir, conf.name).load(env.container_id, env.ifname)
        from podnet import plumbing
        plumbing.check(nsfd, env.ifname, rec.host_ifname if rec else _host_ifname(env), ips)
    finally:
        os.close(nsfd)


# --- STATUS ---------------------------------------------------------------------------

def cmd_status(conf: NetConf, env: CniEnv) -> None:
    versions.require_at_least(conf.cni_version, "1.1.0", "STATUS")
    if conf.uses_agent:
        try:
            _agent(conf, _request("STATUS", conf, env))
        except agent_client.AgentUnavailable as e:
            raise CNIError(PLUGIN_NOT_AVAILABLE, e.msg, e.details) from None
    if not conf.ipam_is_tortie:
        from cni_plugin import ipam_exec
        try:
            ipam_exec.find_plugin(conf.ipam_type, env.path)
        except CNIError as e:
            raise CNIError(PLUGIN_NOT_AVAILABLE, e.msg, e.details) from None
        # A delegate that speaks 1.1.0 is asked too, and its answer is ours.
        if ipam_exec.supports(conf, env.path, "1.1.0"):
            ipam_exec.execute(conf, ipam_exec.Invocation("STATUS"), env.path)


# --- GC -------------------------------------------------------------------------------

def cmd_gc(conf: NetConf, env: CniEnv) -> None:
    versions.require_at_least(conf.cni_version, "1.1.0", "GC")
    valid = set(conf.valid_attachments or [])
    errors: list[CNIError] = []
    if conf.uses_agent:
        _agent(conf, _request("GC", conf, env))  # valid attachments are in the config
    if not conf.ipam_is_tortie:
        from cni_plugin import ipam_exec
        from cni_plugin.attachments import AttachmentStore
        store = AttachmentStore(conf.state_dir, conf.name)
        for rec in store.all():
            if (rec.container_id, rec.ifname) in valid:
                continue
            log.info("GC: removing stale attachment %s/%s (%s)", rec.container_id, rec.ifname, rec.host_ifname)
            try:
                if not conf.uses_agent:
                    from podnet import plumbing
                    plumbing.teardown(None, rec.ifname, rec.host_ifname)
                ipam_exec.release_attachment(conf, env.path, rec.container_id, rec.ifname, rec.cni_args)
                store.remove(rec.container_id, rec.ifname)
            except CNIError as e:  # keep going: remove as much as possible, report after
                log.error("GC of %s/%s failed: %s", rec.container_id, rec.ifname, e.msg)
                errors.append(e)
        if ipam_exec.supports(conf, env.path, "1.1.0"):
            ipam_exec.execute(conf, ipam_exec.Invocation("GC"), env.path)
    if errors:
        first = errors[0]
        raise CNIError(first.code, f"GC left {len(errors)} attachment(s): {first.msg}", first.details)


# --- VERSION --------------------------------------------------------------------------

def cmd_version(requested: str) -> dict:
    version = requested if requested in versions.SUPPORTED_VERSIONS else versions.LATEST
    return {"cniVersion": version, "supportedVersions": list(versions.SUPPORTED_VERSIONS)}
