"""The CNI service: ADD / DEL / CHECK / STATUS / GC on top of IPAM, the pod plumbing
(podnet.plumbing, run on a worker thread because setns is per thread) and the agent's
endpoint registry (register returns once the endpoint's policy is programmed, so a pod
never runs unprotected).  Any ADD failure undoes every step; an ADD a crash interrupts is
rolled back at the next start (its intent is on disk).  The local API server
(localapi.py) hands it validated requests."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from typing import Any, Protocol

from podnet import naming, versions
from podnet.errors import DATAPLANE_FAILURE, INVALID_CONFIG, INVALID_ENV, IPAM_FAILURE, PLUGIN_NOT_AVAILABLE, CNIError
from podnet.result import Interface, IPConfig, Result

from felix_agent.agent.cni_request import NEEDS_ATTACHMENT, CNIRequest
from felix_agent.agent.cni_result import as_cni_error, default_routes, host_cidr, host_mac_of
from felix_agent.agent.intents import AddIntent, IntentLog
from felix_agent.agent.keyed_locks import KeyedLocks
from felix_agent.agent.request_steps import record_step, step
from felix_agent.dataplane.retired_links import RetiredLinkReaper
from felix_agent.ipam import IPAM, Allocation, IPAMError
from felix_agent.model import WorkloadEndpoint
from felix_agent.tasks import cancelled_from_outside

log = logging.getLogger("tortie.localapi")


class Registry(Protocol):
    """What the service needs of the agent's EndpointRegistry (felix_agent/agent/endpoints.py)."""

    async def register(self, wep: WorkloadEndpoint) -> None:
        """Record the endpoint; return only once its policy is programmed."""
        ...

    async def unregister(self, namespace: str, pod: str) -> None: ...


def _k8s_or_default(namespace: str, pod: str, container_id: str) -> tuple[str, str]:
    """Without Kubernetes args (cnitool, a bare runtime) the container id names the
    workload, in namespace "" (podnet.naming names its veth the same way)."""
    if namespace and pod:
        return namespace, pod
    return "", container_id


class CNIService:
    """The local API's handler.  `executor` runs the plumbing (blocking netlink/setns
    work); `plumbing` defaults to the podnet.plumbing module."""

    def __init__(self, ipam: IPAM, registry: Registry, node_name: str,
                 executor: concurrent.futures.Executor, *, plumbing: Any = None,
                 register_timeout: float = 30.0, intents: IntentLog | None = None):
        if plumbing is None:
            from podnet import plumbing as _plumbing
            plumbing = _plumbing
        self.ipam = ipam
        self.registry = registry
        self.node = node_name
        self.executor = executor
        self.plumbing = plumbing
        self.register_timeout = register_timeout
        self.intents = intents  # None: no crash recovery (tests of the service alone)
        # host veth -> container id of the sandbox that owns it now.  A pod's veth name
        # depends only on namespace/pod, so a late DEL of a replaced sandbox must not tear
        # down its successor's veth.  After a restart, IPAM's records stand in for this.
        self._owner: dict[str, str] = {}
        # Requests for one host veth run one at a time: a runtime's retried ADD, or a late
        # DEL of an old sandbox racing the ADD of its successor, must not interleave.
        self._veth_locks = KeyedLocks()
        # DEL retires the host veth and a reaper deletes it later (felix_agent/dataplane/retired_links.py);
        # a plumbing without retire() (a test double) tears down synchronously.
        self._retire = getattr(plumbing, "retire", None)
        reap = getattr(plumbing, "reap_retired", None)
        self.reaper = RetiredLinkReaper(reap, executor) if self._retire and reap else None

    async def handle(self, req: CNIRequest, netns_fd: int | None) -> dict:
        if req.command in NEEDS_ATTACHMENT:
            waiting = time.monotonic()
            async with self._veth_locks.hold(self._identity(req)[2]):
                record_step("lock", waiting)
                if req.command == "ADD":
                    return await self.add(req, netns_fd)
                if req.command == "DEL":
                    await self.delete(req)
                    return {}
                await self.check(req, netns_fd)
                return {}
        if req.command == "STATUS":
            self.status(req)
            return {}
        if req.command == "GC":
            await self.gc(req)
            return {}
        raise CNIError(INVALID_ENV, f"unknown command {req.command!r}")

    def _identity(self, req: CNIRequest) -> tuple[str, str, str]:
        """(k8s namespace, pod, host veth) of the attachment.  DEL may come without
        Kubernetes args; IPAM's record of the attachment then names the pod."""
        namespace, pod = req.namespace, req.pod
        if not (namespace and pod):
            allocs = self.ipam.allocations_for(req.container_id, req.ifname)
            if allocs and allocs[0].namespace:
                namespace, pod = allocs[0].namespace, allocs[0].pod
        return namespace, pod, naming.host_iface_for(namespace or None, pod or None, req.container_id, req.ifname)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def _uses_ipam(self, req: CNIRequest) -> bool:
        return not req.ips

    # -- ADD ------------------------------------------------------------------------------

    async def add(self, req: CNIRequest, netns_fd: int | None) -> dict:
        namespace, pod = _k8s_or_default(req.namespace, req.pod, req.container_id)
        host_if = naming.host_iface_for(req.namespace, req.pod, req.container_id, req.ifname)
        if self.intents is None:
            return await self._add(req, netns_fd, namespace, pod, host_if)
        self.intents.begin(AddIntent(req.container_id, req.ifname, req.namespace, req.pod, host_if))
        try:
            return await self._add(req, netns_fd, namespace, pod, host_if)
        finally:  # answered: done or rolled back (a crash before this leaves the intent)
            self.intents.end(req.container_id, req.ifname)

    async def recover_interrupted(self) -> int:
        """Roll back every ADD a crash interrupted (its intent is still on disk): the same
        steps as a DEL (veth, routes, endpoint, address; a veth another sandbox owns by
        now stays).  Runs at start, before the socket serves anything, so no retry of the
        same ADD can race it.  Returns how many were rolled back."""
        if self.intents is None:
            return 0
        n = 0
        for it in self.intents.pending():
            ns, pod = (it.namespace, it.pod) if it.namespace and it.pod else ("", "")
            try:
                await self._detach(it.container_id, it.ifname, ns, pod, it.host_if)
                gone = await self.ipam.release(it.container_id, it.ifname)
            except Exception as e:  # noqa: BLE001 - kept: tried again at the next start
                log.error("could not roll back interrupted ADD %s/%s: %s", it.container_id, it.ifname, e)
                continue
            self.intents.end(it.container_id, it.ifname)
            n += 1
            log.warning("rolled back an ADD a crash interrupted: %s/%s (%s, %s)", it.container_id, it.ifname,
                        it.host_if, ", ".join(a.ip for a in gone) or "no address")
        return n

    async def _add(self, req: CNIRequest, netns_fd: int | None, namespace: str, pod: str, host_if: str) -> dict:
        allocated: list[Allocation] = []
        plumbing_tried = registered = False
        if not req.ips and netns_fd is not None:
            # Before allocating or changing anything: the pod's CNI_IFNAME may be another
            # container's (with host-local IPAM the binary, which keeps those records, asks).
            with step("occupant"):
                held = await self._run(self.plumbing.occupant, netns_fd, req.ifname)
            if held is not None:
                owner = self._owner_of(held) if held else None
                if owner != req.container_id:
                    raise self.plumbing.taken_error(req.ifname, req.netns, owner)
        try:
            if req.ips:
                cidrs = list(req.ips)
            else:
                with step("alloc"):
                    # one address of each family the pools (or podCIDRs) offer: dual-stack
                    allocated = await self.ipam.allocate_families(req.container_id, req.ifname,
                                                                  namespace=namespace, pod=pod)
                cidrs = [host_cidr(a.ip) for a in allocated]
            plumbing_tried = True
            with step("plumbing"):
                info = await self._run(self.plumbing.setup, netns_fd, req.ifname, host_if, cidrs, req.conf.mtu,
                                       req.netns)
            host_mac, cont_mac = host_mac_of(info)
            wep = WorkloadEndpoint(namespace=namespace, pod=pod, node=self.node, container_id=req.container_id,
                                   iface=host_if, ips=tuple(c.split("/")[0] for c in cidrs), mac=cont_mac)
            registered = True  # before the await: a register that fails half-way is undone too
            with step("register"):
                await asyncio.wait_for(self.registry.register(wep), self.register_timeout)
        except BaseException as e:
            await self._rollback(req, namespace, pod, host_if, allocated, plumbing_tried, registered)
            if isinstance(e, asyncio.CancelledError) and cancelled_from_outside():
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise CNIError(DATAPLANE_FAILURE, f"the endpoint's policy was not programmed within "
                                                  f"{self.register_timeout:.0f}s", "the agent's dataplane is stuck or failing") from None
            raise as_cni_error(e, "ADD") from None
        self._owner[host_if] = req.container_id
        res = Result(
            interfaces=[Interface(name=host_if, mac=host_mac),
                        Interface(name=req.ifname, mac=cont_mac, sandbox=req.netns)],
            ips=[IPConfig(address=c, interface=1) for c in cidrs],
            routes=default_routes(cidrs))
        return res.to_dict(versions.LATEST)

    async def _rollback(self, req: CNIRequest, namespace: str, pod: str, host_if: str,
                        allocated: list[Allocation], plumbing_tried: bool, registered: bool) -> None:
        """Undo an ADD's steps, newest first; every step is tried even if one fails."""
        if registered:
            try:
                await self.registry.unregister(namespace, pod)
            except Exception as e:  # noqa: BLE001
                log.error("rollback of %s: unregister failed: %s", req.container_id, e)
        if plumbing_tried:
            try:
                await self._run(self.plumbing.teardown, None, req.ifname, host_if)
            except Exception as e:  # noqa: BLE001
                log.error("rollback of %s: teardown of %s failed: %s", req.container_id, host_if, e)
        if allocated:
            try:
                await self.ipam.release(req.container_id, req.ifname)
            except Exception as e:  # noqa: BLE001 - GC frees it later
                log.error("rollback of %s: releasing %s failed: %s", req.container_id,
                          ", ".join(a.ip for a in allocated), e)

    # -- DEL ------------------------------------------------------------------------------

    async def delete(self, req: CNIRequest) -> None:
        """Idempotent: an unknown container, or one already deleted, succeeds."""
        namespace, pod, host_if = self._identity(req)
        await self._detach(req.container_id, req.ifname, namespace, pod, host_if)
        try:
            with step("release"):
                await self.ipam.release(req.container_id, req.ifname)
        except IPAMError as e:
            raise as_cni_error(e, "DEL") from None

    async def _detach(self, container_id: str, ifname: str, namespace: str, pod: str, host_if: str) -> None:
        owner = self._owner_of(host_if)
        if owner not in (None, container_id):
            log.info("DEL %s: %s now belongs to sandbox %s; leaving it", container_id, host_if, owner)
            return
        try:
            with step("teardown"):
                if self.reaper is not None and await self._run(self._retire, host_if):
                    self.reaper.notify()
                else:  # no host veth left (a repeated DEL), or no reaper: the synchronous path
                    await self._run(self.plumbing.teardown, None, ifname, host_if)
        except Exception as e:  # noqa: BLE001
            raise as_cni_error(e, "DEL") from None
        wl_ns, wl_pod = _k8s_or_default(namespace, pod, container_id)
        try:
            with step("unregister"):
                await self.registry.unregister(wl_ns, wl_pod)
        except Exception as e:  # noqa: BLE001 - the runtime retries a failed DEL
            raise CNIError(DATAPLANE_FAILURE, f"could not remove endpoint {wl_ns}/{wl_pod}: {e}") from None
        self._owner.pop(host_if, None)

    def _owner_of(self, host_if: str) -> str | None:
        if host_if in self._owner:
            return self._owner[host_if]
        # After a restart: the newest allocation whose attachment names this veth.
        newest: Allocation | None = None
        for a in self.ipam.allocations():
            ns, pod = a.namespace, a.pod
            if naming.host_iface_for(ns if ns else None, pod if ns else None, a.container_id, a.ifname) != host_if:
                continue
            if newest is None or a.created > newest.created:
                newest = a
        return newest.container_id if newest else None

    # -- CHECK ----------------------------------------------------------------------------

    async def check(self, req: CNIRequest, netns_fd: int | None) -> None:
        host_if = naming.host_iface_for(req.namespace, req.pod, req.container_id, req.ifname)
        if req.ips:
            cidrs = list(req.ips)
        else:
            allocs = self.ipam.allocations_for(req.container_id, req.ifname)
            if not allocs:
                raise CNIError(IPAM_FAILURE, f"no address is allocated to {req.container_id}/{req.ifname}",
                               "the attachment was never added here, or was deleted or garbage-collected")
            cidrs = [host_cidr(a.ip) for a in allocs]
        try:
            await self._run(self.plumbing.check, netns_fd, req.ifname, host_if, cidrs)
        except Exception as e:  # noqa: BLE001
            raise as_cni_error(e, "CHECK") from None

    # -- STATUS ---------------------------------------------------------------------------

    def status(self, req: CNIRequest) -> None:
        if not req.conf.ipam_is_tortie:
            return  # the binary asks the delegated IPAM plugin itself
        ok, why = self.ipam.status()
        if not ok:
            raise CNIError(PLUGIN_NOT_AVAILABLE, f"tortie IPAM cannot allocate: {why}")

    # -- GC -------------------------------------------------------------------------------

    async def gc(self, req: CNIRequest) -> None:
        valid = req.conf.valid_attachments
        if valid is None:
            raise CNIError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments in the config")
        # Interfaces go first, addresses after: an address is free only once no veth or
        # route of the old attachment is left that a new pod with it would collide with.
        leaked = self.ipam.unattached(valid)
        errors, freed = [], []
        for a in leaked:
            ns, pod = (a.namespace, a.pod) if a.namespace else ("", "")
            host_if = naming.host_iface_for(ns or None, pod or None, a.container_id, a.ifname)
            try:
                async with self._veth_locks.hold(host_if):
                    await self._detach(a.container_id, a.ifname, ns, pod, host_if)
            except Exception as e:  # noqa: BLE001 - try every one, report at the end
                errors.append(f"{a.container_id}/{a.ifname}: {e}")
                continue
            freed.append(a.ip)
        try:
            await self.ipam.release_ips(freed)
        except IPAMError as e:
            raise as_cni_error(e, "GC") from None
        if freed:
            log.info("GC freed %d leaked attachments: %s", len(freed), ", ".join(freed))
        if errors:
            raise CNIError(DATAPLANE_FAILURE, f"GC freed {len(freed)} addresses but could not remove "
                                              f"{len(errors)} interfaces", "; ".join(errors))
