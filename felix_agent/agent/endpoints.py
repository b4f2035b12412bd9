"""EndpointRegistry: the endpoints this node serves, as the CNI service registers and
unregisters them (and as they are found again at start-up).

The agent is the authority on its own node's WorkloadEndpoints: it wired them.  The
datastore's copies are what it has published for other nodes, nothing more, so they never
override what the registry holds; a copy that differs makes the endpoint publisher
(endpoint_publisher.py) write the registry's version again.  A CNI ADD gets its answer
only once a dataplane pass that includes its endpoint has completed, so no pod runs
before its policy.
"""
from __future__ import annotations

import logging
import time

from felix_agent.agent.endpoint_publisher import EndpointPublisher
from felix_agent.agent.state import ModelState
from felix_agent.logs import kv
from felix_agent.model import Update, WorkloadEndpoint

log = logging.getLogger("tortie.agent")


class EndpointRegistry:
    def __init__(self, node: str, state: ModelState, reader=None):
        """`reader` reads a Pod at ADD time (the EtcdStore; None in kubernetes mode)."""
        self.node = node
        self.state = state
        self.reader = reader
        self.publisher: EndpointPublisher | None = None  # etcd mode
        self.local: dict[str, WorkloadEndpoint] = {}
        # Host veths found at start-up (see set_startup_ifaces), until the first sync; and
        # endpoints deleted before it, which must not be adopted from a stale copy.
        self._startup_ifaces: set[str] | None = None
        self._gone_before_sync: set[str] = set()

    def serves(self, key: str) -> bool:
        return key in self.local

    def sorted(self) -> list[WorkloadEndpoint]:
        return sorted(list(self.local.values()), key=lambda w: w.key)

    # -- start-up -------------------------------------------------------------------------

    def adopt(self, wep: WorkloadEndpoint) -> None:
        """An endpoint found at start-up (persisted allocation with its veth present)."""
        self.local[wep.key] = wep
        self.state.inject(Update("WorkloadEndpoint", wep.key, wep))

    def set_startup_ifaces(self, names: set[str]) -> None:
        """The host veths present at start-up: until the first sync, this node's endpoints
        in the datastore whose veth is among them are adopted."""
        self._startup_ifaces = set(names)

    def synced(self) -> None:
        """The first list is in: adoption is over."""
        self._startup_ifaces = None
        self._gone_before_sync.clear()

    # -- the datastore's copies -----------------------------------------------------------

    def datastore_copy(self, key: str, value: WorkloadEndpoint | None) -> bool:
        """The datastore's copy of one of this node's endpoints changed; True when it now
        differs from what this node serves (the publisher must write it again)."""
        local = self.local.get(key)
        if (local is None and value is not None and self._startup_ifaces is not None
                and value.iface in self._startup_ifaces and key not in self._gone_before_sync):
            # Wired before a restart through a non-tortie IPAM plugin (no allocation here to
            # restore it from): its veth is still up, so this node still serves it.
            log.info("adopted endpoint from the datastore", extra=kv(key=key, iface=value.iface))
            self.adopt(value)
            return False
        if local is None:
            # Not served here: left over from a DEL that could not reach the datastore or
            # from a crash.  It is not wired, so it stays out of the model, and the
            # publisher removes it from the datastore.
            return value is not None
        if value == local:
            return False
        if (value is not None and not local.mac and value.container_id == local.container_id
                and value.iface == local.iface and value.ips == local.ips):
            # An endpoint adopted at start-up knows no MAC; the published copy does.
            self.local[key] = value
            self.state.inject(Update("WorkloadEndpoint", key, value))
            return False
        return True  # the datastore lost or garbled it: publish ours again

    # -- the CNI service's calls ----------------------------------------------------------

    async def register(self, wep: WorkloadEndpoint) -> None:
        """Record a local endpoint and return once its policy is programmed.

        Publishing the endpoint to the datastore is the publisher task's job, not the
        ADD's: the etcd write (2-3 ms here, an fsync on the etcd side) would otherwise be
        on every ADD's path, and other nodes learn of the pod through their watches after
        the write whenever it lands.  Order that must hold: the pod's labels are learnt
        before the endpoint enters the model (the pass programs the right policy).  One
        exception: an agent that has never synced writes at once and fails the ADD if the
        datastore is unreachable, since it has no policy to program the pod with and that
        pass would never come."""
        t0 = time.monotonic()
        await self._learn_pod(wep.namespace, wep.pod)
        t_learn = time.monotonic()
        self.local[wep.key] = wep
        self.state.inject(Update("WorkloadEndpoint", wep.key, wep))
        target = self.state.generation
        self.state.wake()
        if self.publisher is not None:
            if self.state.synced_once:
                self.publisher.schedule()
            else:
                await self.publisher.publish_now(wep)
        await self.state.wait_programmed(target)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("endpoint registered", extra=kv(
                key=wep.key, learn_ms=f"{(t_learn - t0) * 1000:.1f}",
                wait_ms=f"{(time.monotonic() - t_learn) * 1000:.1f}"))

    async def _learn_pod(self, namespace: str, pod: str) -> None:
        """The pod's labels decide which policies select it; if its Pod record has not
        reached us through the watch yet, read it now, so the chains programmed before the
        ADD answers are the right ones (Calico's CNI plugin reads the pod for the same
        reason).  Without a readable datastore the watch delivers it later."""
        if self.reader is None or not namespace or f"{namespace}/{pod}" in self.state.cluster.pods:
            return
        try:
            record = await self.reader.get("Pod", pod, namespace)
        except (ConnectionError, OSError) as e:
            log.debug("pod not readable at ADD", extra=kv(pod=f"{namespace}/{pod}", error=e))
            return
        if record is not None:
            self.state.inject(Update("Pod", record.key, record))

    async def unregister(self, namespace: str, pod: str) -> None:
        """Take a local endpoint out of the model; the publisher deletes its datastore copy."""
        key = f"{self.node}/{namespace}/{pod}"
        self.local.pop(key, None)
        if self._startup_ifaces is not None:
            self._gone_before_sync.add(key)
        self.state.inject(Update("WorkloadEndpoint", key, None))
        self.state.wake()
        if self.publisher is not None:
            self.publisher.schedule()
