"""NodeRegistrar (etcd mode): publishes this node's address, AS, VTEP and IPIP tunnel
address on its Node record (keeping labels and fields others set, e.g. the route-reflector
cluster id), whenever what the datastore holds differs.  The write is the datastore
Publisher's."""
from __future__ import annotations

import dataclasses
import logging

from felix_agent.datastore.publisher import Publisher
from felix_agent.logs import kv
from felix_agent.model import Node

log = logging.getLogger("tortie.main")


class NodeRegistrar:
    def __init__(self, writer: Publisher, name: str, node_ip: str, as_number: int, node_ip6: str = ""):
        self.writer, self.name, self.node_ip, self.as_number = writer, name, node_ip, as_number
        self.node_ip6 = node_ip6

    def wanted(self, current: Node | None, plan) -> Node:
        n = current or Node(name=self.name)
        changes = {"ip": self.node_ip}
        if self.node_ip6:
            changes["ip6"] = self.node_ip6
        if self.as_number:
            changes["as_number"] = self.as_number
        if plan is not None and plan.vxlan is not None:
            changes["vxlan_tunnel_addr"] = plan.vxlan.addr
            changes["vxlan_tunnel_mac"] = plan.vxlan.mac
        if plan is not None and getattr(plan, "vxlan6", None) is not None:
            changes["vxlan_tunnel_addr6"] = plan.vxlan6.addr
            changes["vxlan_tunnel_mac6"] = plan.vxlan6.mac
        if plan is not None and getattr(plan, "ipip_addr", None):
            changes["ipip_tunnel_addr"] = plan.ipip_addr
        return dataclasses.replace(n, **changes)

    async def sync(self, current: Node | None, plan) -> None:
        """`current`: the Node record as the model holds it; `plan` the pass's plan."""
        want = self.wanted(current, plan)
        if want != current:
            await self.writer.put_node(want)
            log.info("published this node's record", extra=kv(node=self.name, ip=want.ip,
                                                               vtep=want.vxlan_tunnel_addr or "-"))
