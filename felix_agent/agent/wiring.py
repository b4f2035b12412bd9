"""Agent: one node's agent parts, made and connected (the only place that knows them all):

- ModelState (state.py): the model, its generation, the loop's inbox;
- EndpointRegistry (endpoints.py): the endpoints this node serves, for the CNI service;
- EndpointPublisher (endpoint_publisher.py, etcd mode): the datastore's copies of them,
  written through the datastore's Publisher, as are the Node record (registrar.py) and
  the IPAM block claims (felix_agent/ipam/backends.py);
- AgentLoop (loop.py): syncer events -> model -> calc and dataplane passes;
- StatusView (status.py): the /status document;
- IPAMSync (ipam_sync.py): the node's IPAM following the model.
"""
from __future__ import annotations

from felix_agent.agent.endpoint_publisher import EndpointPublisher
from felix_agent.agent.endpoints import EndpointRegistry
from felix_agent.agent.ipam_sync import IPAMSync
from felix_agent.agent.loop import AgentLoop
from felix_agent.agent.registrar import NodeRegistrar
from felix_agent.agent.state import ModelState, Status
from felix_agent.agent.status import StatusView
from felix_agent.config import AgentConfig
from felix_agent.datastore.publisher import Publisher


class Agent:
    def __init__(self, cfg: AgentConfig, dataplane, syncer, store=None, writer: Publisher | None = None):
        """`store` is the EtcdStore (None in kubernetes mode: the agent then writes
        nothing); `writer` the datastore Publisher on it (made here when not given)."""
        self.cfg = cfg
        self.node = cfg.name
        self.writer = writer or (Publisher(store) if store is not None else None)
        self.state = ModelState()
        self.status = status = Status(node=self.node, datastore=cfg.datastore)
        self.endpoints = EndpointRegistry(self.node, self.state, reader=store)
        self.publisher = None
        if self.writer is not None:
            self.publisher = EndpointPublisher(self.writer, self.node, self.state, status,
                                               served=self.endpoints.local, syncer=syncer)
            self.endpoints.publisher = self.publisher
            if hasattr(syncer, "on_bad_record"):
                syncer.on_bad_record = self.publisher.bad_record_seen
        self.loop = AgentLoop(cfg, dataplane, syncer, self.state, status, self.endpoints, self.publisher)
        self.health = self.loop.health
        bird = getattr(dataplane, "bird", None)
        if bird is not None:
            self.health.holds = lambda: {"bgp": "BIRD restarted and waits for its peers' routes (graceful restart)"} \
                if bird.recovering() else {}
        self.view = StatusView(status, self.health, dataplane, syncer, self.endpoints)

    def attach_ipam(self, ipam, pod_cidr_backend=None) -> None:
        """`pod_cidr_backend` (kubernetes mode) gets this node's Node.spec.podCIDRs."""
        self.loop.ipam = IPAMSync(self.node, ipam, self.state.cluster, pod_cidr_backend)
        self.view.ipam = ipam

    def register_node(self, node_ip: str, as_number: int, node_ip6: str = "") -> None:
        """Publish this node's Node record after each pass (etcd mode)."""
        self.loop.registrar = NodeRegistrar(self.writer, self.node, node_ip, as_number, node_ip6)

    def shutdown(self) -> None:
        self.loop.shutdown()
