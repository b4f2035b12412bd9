"""tortie-agent: wires the datastore, IPAM, local API, calc and dataplane together and runs
them until SIGTERM/SIGINT.  Shutdown stops taking CNI requests, finishes those in flight
and leaves every route, chain, ipset and BIRD in place."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys

from felix_agent import config, logs

from felix_agent.agent import health
from felix_agent.agent.wiring import Agent
from felix_agent.datastore.publisher import Publisher
from felix_agent.logs import kv
from felix_agent.model import WorkloadEndpoint
from felix_agent.agent.supervise import FatalError, supervise

log = logging.getLogger("tortie.main")


def detect_uplink(cfg: config.AgentConfig) -> tuple[str, str]:
    """(uplink interface, node IPv4 with prefix): from config, else the default route's
    interface (IPv4's, else IPv6's) and its first IPv4 address.  An IPv6-only node (no
    IPv4 on the uplink, an IPv6 one there or in node_ip6) gets "" as its IPv4 address."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        uplink = cfg.uplink
        for family in (2, 10):
            for r in ipr.get_default_routes(family=family) if not uplink else ():
                oif = r.get("RTA_OIF")
                if oif:
                    uplink = ipr.get_links(oif)[0].get("IFLA_IFNAME")
                    break
        if not uplink:
            raise config.ConfigError("uplink: no default route to find the uplink; set --uplink")
        node_ip = cfg.node_ip
        if not node_ip:
            idx = ipr.link_lookup(ifname=uplink)
            if not idx:
                raise config.ConfigError(f"uplink: interface {uplink!r} does not exist")
            for a in ipr.get_addr(family=2, index=idx[0]):
                node_ip = f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                break
    if not node_ip and not detect_ip6(cfg, uplink):
        raise config.ConfigError(f"node_ip: {uplink} has no IPv4 or global IPv6 address; set --node-ip "
                                 "or --node-ip6")
    return uplink, node_ip


def detect_ip6(cfg: config.AgentConfig, uplink: str) -> str:
    """This node's IPv6 address with prefix: from config, else the uplink's first global
    IPv6 address ("" when it has none: the node then routes IPv4 only)."""
    if cfg.node_ip6:
        return cfg.node_ip6
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=uplink)
        for a in ipr.get_addr(family=10, index=idx[0]) if idx else ():
            if a["scope"] == 0:  # global, not the link-local
                return f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
    return ""


def restore_local_endpoints(ipam, node: str) -> tuple[list[WorkloadEndpoint], set[str]]:
    """Endpoints this node served before a restart, from the persisted IPAM allocations,
    so their chains stay programmed before the first CNI call arrives; and the names of
    the host veths present (endpoints wired through another IPAM plugin have no allocation
    here: the agent adopts them from the datastore if their veth is among these)."""
    from pyroute2 import IPRoute

    from podnet.naming import host_iface_for

    weps: dict[tuple[str, str], WorkloadEndpoint] = {}  # a dual-stack attachment has two allocations
    with IPRoute() as ipr:
        present = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipam.allocations():
            iface = host_iface_for(a.namespace, a.pod, a.container_id, a.ifname)
            if iface not in present:
                continue  # the pod is gone; CNI GC frees its address
            had = weps.get(a.attachment)
            weps[a.attachment] = WorkloadEndpoint(namespace=a.namespace, pod=a.pod or a.container_id, node=node,
                                                  container_id=a.container_id, iface=iface,
                                                  ips=(had.ips if had else ()) + (a.ip,))
    return list(weps.values()), {name for name in present if name and name.startswith("cali")}


async def run(cfg: config.AgentConfig, uplink: str, node_ip: str, node_ip6: str = "") -> None:
    from felix_agent.dataplane.barrier import Dataplane
    from felix_agent.ipam import IPAM, EtcdBackend, PodCIDRBackend
    from felix_agent.agent.intents import IntentLog
    from felix_agent.agent.cni_service import CNIService
    from felix_agent.agent.localapi import LocalAPI

    log.info("starting", extra=kv(node=cfg.name, datastore=cfg.datastore, uplink=uplink, node_ip=node_ip,
                                  node_ip6=node_ip6 or "-"))
    dataplane = Dataplane(cfg.name, uplink, iptables_backend=cfg.iptables_backend,
                          wl_to_host_action=cfg.wl_to_host_action, run_dir=cfg.run_dir, bird=cfg.bird,
                          bird_bin=cfg.bird_bin, birdc_bin=cfg.birdc_bin,
                          derive_vteps=cfg.datastore == "kubernetes", node_ip=node_ip, node_ip6=node_ip6,
                          ensure_forwarding=cfg.ensure_forwarding, bgp_password_file=cfg.bgp_password_file)
    store = writer = None
    if cfg.datastore == "etcd":
        from felix_agent.datastore.etcd import EtcdStore, EtcdSyncer
        from felix_agent.datastore.etcd_tls import EtcdTLS, TLSConfigError

        tls = EtcdTLS(cfg.etcd_ca_file, cfg.etcd_cert_file, cfg.etcd_key_file) if cfg.etcd_tls else None
        if tls is not None:
            try:
                tls.check()
            except TLSConfigError as e:
                raise config.ConfigError(str(e)) from None
        store = EtcdStore(cfg.etcd_host, cfg.etcd_port, cfg.etcd_prefix, tls=tls)
        # The watch gets a connection of its own: nothing on the ADD path shares its channel.
        syncer = EtcdSyncer(store.clone())
        writer = Publisher(store)  # every write this agent makes
        backend = EtcdBackend(store, writer)
    elif cfg.fanout_endpoints:  # the kubernetes datastore through tortie-fanout: no API watches here
        from felix_agent.datastore.fanout.client import FanoutSyncer

        syncer = FanoutSyncer(cfg.fanout_addresses, cfg.name)
        backend = PodCIDRBackend(cfg.name)
    else:
        from felix_agent.datastore.kubernetes import KubernetesSyncer

        syncer = KubernetesSyncer(kubeconfig=cfg.kubeconfig or None)
        backend = PodCIDRBackend(cfg.name)
    agent = Agent(cfg, dataplane, syncer, store, writer)
    agent.view.node_ip = node_ip
    ipam = IPAM(cfg.name, backend, os.path.join(cfg.state_dir, "ipam"))
    await ipam.start()
    agent.attach_ipam(ipam, backend if cfg.datastore == "kubernetes" else None)
    loop = asyncio.get_running_loop()
    # pyroute2's IPRoute cannot be used on the event loop's own thread.
    weps, ifaces = await loop.run_in_executor(None, restore_local_endpoints, ipam, cfg.name)
    for wep in weps:
        agent.endpoints.adopt(wep)
    agent.endpoints.set_startup_ifaces(ifaces)
    if store is not None and cfg.register_node:
        agent.register_node(node_ip, cfg.as_number, node_ip6)
    server = health.serve(agent.health, cfg.http_host, cfg.http_port, status=agent.view.as_dict) \
        if cfg.http_port else None
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="plumbing")
    service = CNIService(ipam, agent.endpoints, cfg.name, executor,
                         intents=IntentLog(os.path.join(cfg.state_dir, "intents")))
    await service.recover_interrupted()  # ADDs a crash cut short: rolled back before serving
    if service.reaper is not None:
        await service.reaper.flush()  # veths retired by DELs just before a crash or restart
    api = LocalAPI(cfg.socket_path, service)
    await api.start()
    log.info("local API listening", extra=kv(socket=cfg.socket_path))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    core = {"syncer": lambda: syncer.run(agent.loop.emit), "loop": lambda: agent.loop.run_loop(stop)}
    if agent.publisher is not None:
        core["publisher"] = agent.publisher.run
    tasks = [asyncio.create_task(supervise(name, fn, stop), name=name) for name, fn in core.items()]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    fatal = None
    for t in done:
        if t is not stopper and not t.cancelled() and t.exception() is not None:
            fatal = f"{t.get_name()}: {type(t.exception()).__name__}: {t.exception()}"
            log.error("fatal error; exiting", extra=kv(task=t.get_name(), error=repr(t.exception())))
    log.info("shutting down; the dataplane stays in place")
    await api.stop()
    if service.reaper is not None:
        await service.reaper.flush()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ipam.close()
    if store is not None:
        await store.close()
    agent.shutdown()
    executor.shutdown(wait=False)
    if server:
        server.shutdown()
    if fatal:
        raise FatalError(fatal)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = config.load(argv)
    except config.ConfigError as e:
        print(f"tortie-agent: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    logs.setup(cfg.log_level)
    try:
        uplink, node_ip = detect_uplink(cfg)
        asyncio.run(run(cfg, uplink, node_ip, detect_ip6(cfg, uplink)))
    except config.ConfigError as e:
        print(f"tortie-agent: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    except FatalError as e:
        print(f"tortie-agent: fatal error in task {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
