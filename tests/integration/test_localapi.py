"""The local API end to end (root, netns lab): LocalAPI + CNIService + IPAM + the real
plumbing, driven through the CNI binary's own client (cni_plugin.agent_client) with a
real pod netns fd.

The registry is a fake that records calls (the agent implements the real one); every
other part is real.  The test process stays in the root namespace: the plumbing runs on
worker threads that entered the lab node's namespace (setns is per thread), exactly as
the agent's workers run in the node's namespace.
"""
import asyncio
import concurrent.futures
import os
import stat

import pytest

from cni_plugin import agent_client
from podnet.errors import DATAPLANE_FAILURE, TRY_AGAIN_LATER, CNIError
from podnet.naming import host_iface_name
from felix_agent.ipam import IPAM, PodCIDRBackend
from felix_agent.agent.cni_service import CNIService
from felix_agent.agent.localapi import LocalAPI
from tests.lab.nsproxy import setns

pytestmark = pytest.mark.root

CONF = {"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "tortie", "ipam": {"type": "tortie"},
        "mtu": 1450}
POD_CIDR = "10.244.7.0/24"


class RecordingRegistry:
    """Fake EndpointRegistry: records calls; `gate` holds register() until set; `fail`
    makes register() raise after recording."""

    def __init__(self):
        self.calls = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail: Exception | None = None

    async def register(self, wep):
        self.calls.append(("register", wep))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail

    async def unregister(self, namespace, pod):
        self.calls.append(("unregister", namespace, pod))


def _enter(ns):
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        setns(fd)
    finally:
        os.close(fd)


class Harness:
    def __init__(self, lab, tmp_path, pod_cidr=POD_CIDR):
        self.lab = lab
        self.node = lab.nodes[0]
        self.sock = str(tmp_path / "run" / "agent.sock")
        self.state = str(tmp_path / "ipam")
        self.pod_cidr = pod_cidr
        self.workers = concurrent.futures.ThreadPoolExecutor(
            8, thread_name_prefix="plumbing", initializer=_enter, initargs=(self.node.ns,))
        self.clients = concurrent.futures.ThreadPoolExecutor(24, thread_name_prefix="cni-client")
        self.registry = RecordingRegistry()

    async def start(self):
        self.ipam = IPAM("node1", PodCIDRBackend("node1", [self.pod_cidr]), self.state)
        await self.ipam.start()
        self.service = CNIService(self.ipam, self.registry, "node1", self.workers)
        self.api = LocalAPI(self.sock, self.service)
        await self.api.start()
        return self

    async def stop(self):
        await self.api.stop()
        await self.ipam.close()

    def close(self):
        self.workers.shutdown(wait=True)
        self.clients.shutdown(wait=True)

    def _call(self, request, netns):
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY) if netns else None
        try:
            return agent_client.call(self.sock, request, (fd,) if fd is not None else (), timeout=60)
        finally:
            if fd is not None:
                os.close(fd)

    def call(self, command, pod_ns, pod, cid, send_fd=True, args=True, **extra):
        request = {"command": command, "container_id": cid, "ifname": "eth0",
                   "netns": f"/var/run/netns/{pod_ns}", "config": dict(CONF), **extra}
        if args:
            request["args"] = {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": pod}
        return asyncio.get_running_loop().run_in_executor(
            self.clients, self._call, request, pod_ns if send_fd else None)

    def links(self, ns):
        return self.lab.exec(ns, "ip", "-o", "link", "show").stdout


@pytest.fixture
def harness(make_lab, tmp_path):
    lab = make_lab(1)
    h = Harness(lab, tmp_path)
    yield h
    h.close()


def test_add_wires_the_pod_after_registering_and_del_cleans_up(harness):
    h = harness
    pod_ns = h.lab.add_pod_ns("web")
    host_if = host_iface_name("default", "web-0")

    async def body():
        await h.start()
        st = os.stat(h.sock)
        assert stat.S_IMODE(st.st_mode) == 0o600
        h.registry.gate = asyncio.Event()
        add = h.call("ADD", pod_ns, "web-0", "cid1")
        await asyncio.wait_for(h.registry.entered.wait(), 30)
        # The endpoint is registered but its policy not yet programmed: no answer yet.
        await asyncio.sleep(0.2)
        assert not add.done()
        h.registry.gate.set()
        res = await add

        assert res["cniVersion"] == "1.1.0"
        host, cont = res["interfaces"]
        assert host == {"name": host_if, "mac": "ee:ee:ee:ee:ee:ee"}
        assert cont["name"] == "eth0" and cont["sandbox"] == f"/var/run/netns/{pod_ns}" and cont["mac"]
        (ipc,) = res["ips"]
        assert ipc["interface"] == 1 and ipc["address"].startswith("10.244.7.") and ipc["address"].endswith("/32")
        assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
        ip = ipc["address"].split("/")[0]

        (kind, wep), = h.registry.calls
        assert kind == "register"
        assert (wep.namespace, wep.pod, wep.node, wep.container_id, wep.iface, wep.ips, wep.mac) == (
            "default", "web-0", "node1", "cid1", host_if, (ip,), cont["mac"])
        assert [a.ip for a in h.ipam.allocations_for("cid1")] == [ip]

        # Real packets both ways; the mtu from the config reached both ends.
        assert h.lab.ping(h.node.ns, ip)
        assert h.lab.ping(pod_ns, h.node.ip)
        assert "mtu 1450" in h.lab.exec(pod_ns, "ip", "link", "show", "eth0").stdout
        # CHECK agrees, then finds a broken pod route.
        assert await h.call("CHECK", pod_ns, "web-0", "cid1") == {}
        h.lab.exec(pod_ns, "ip", "route", "del", "default")
        with pytest.raises(CNIError, match="default route") as ei:
            await h.call("CHECK", pod_ns, "web-0", "cid1")
        assert ei.value.code == DATAPLANE_FAILURE

        assert await h.call("DEL", pod_ns, "web-0", "cid1", send_fd=False) == {}
        assert host_if not in h.links(h.node.ns)
        # The veth was retired (down, renamed), not yet destroyed: the pod has lost its carrier
        # at once, and the reaper deletes the pair shortly after (felix_agent/dataplane/retired_links.py).
        assert "NO-CARRIER" in h.lab.exec(pod_ns, "ip", "link", "show", "eth0", check=False).stdout or \
            "eth0" not in h.links(pod_ns)
        deadline = asyncio.get_running_loop().time() + 10
        while "eth0" in h.links(pod_ns) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert "eth0" not in h.links(pod_ns)
        assert h.ipam.allocations() == []
        assert h.registry.calls[-1] == ("unregister", "default", "web-0")
        # DEL is idempotent.
        assert await h.call("DEL", pod_ns, "web-0", "cid1", send_fd=False) == {}
        await h.stop()
    asyncio.run(body())


def test_registry_failure_rolls_everything_back(harness):
    h = harness
    pod_ns = h.lab.add_pod_ns("doomed")
    host_if = host_iface_name("default", "doomed")

    async def body():
        await h.start()
        h.registry.fail = RuntimeError("dataplane exploded")
        with pytest.raises(CNIError, match="dataplane exploded") as ei:
            await h.call("ADD", pod_ns, "doomed", "cid-x")
        assert ei.value.code == DATAPLANE_FAILURE
        assert host_if not in h.links(h.node.ns)
        assert "eth0" not in h.links(pod_ns)
        assert "10.244.7." not in h.lab.exec(h.node.ns, "ip", "route").stdout
        assert h.ipam.allocations() == []
        assert [c[0] for c in h.registry.calls] == ["register", "unregister"]
        # The pod can be added once the registry works again.
        h.registry.fail = None
        res = await h.call("ADD", pod_ns, "doomed", "cid-x")
        assert h.lab.ping(h.node.ns, res["ips"][0]["address"].split("/")[0])
        await h.stop()
    asyncio.run(body())


def test_plumbing_failure_releases_the_address(harness):
    h = harness
    pod_ns = h.lab.add_pod_ns("busy")
    # Something already holds eth0 in the pod: setup must refuse and nothing may stay.
    h.lab.exec(pod_ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")

    async def body():
        await h.start()
        with pytest.raises(CNIError, match="already exists") as ei:
            await h.call("ADD", pod_ns, "busy", "cid-b")
        assert ei.value.code == DATAPLANE_FAILURE
        assert h.ipam.allocations() == []
        assert host_iface_name("default", "busy") not in h.links(h.node.ns)
        assert h.registry.calls == []  # never got as far as registering
        assert "eth0" in h.links(pod_ns)  # not ours: left alone
        await h.stop()
    asyncio.run(body())


def test_exhausted_pod_cidr_is_a_clear_cni_error(make_lab, tmp_path):
    lab = make_lab(1)
    h = Harness(lab, tmp_path, pod_cidr="10.244.9.0/30")  # two usable addresses
    pods = [lab.add_pod_ns(f"x{i}") for i in range(3)]

    async def body():
        await h.start()
        for i in range(2):
            await h.call("ADD", pods[i], f"x{i}", f"cx{i}")
        with pytest.raises(CNIError, match=r"podCIDRs 10.244.9.0/30 are exhausted") as ei:
            await h.call("ADD", pods[2], "x2", "cx2")
        assert ei.value.code == TRY_AGAIN_LATER
        assert "eth0" not in h.links(pods[2])
        await h.stop()
    try:
        asyncio.run(body())
    finally:
        h.close()


def test_twenty_concurrent_adds_get_distinct_addresses_and_survive_a_restart(harness):
    h = harness
    pods = [h.lab.add_pod_ns(f"c{i}") for i in range(20)]

    async def body():
        await h.start()
        results = await asyncio.gather(*(h.call("ADD", ns, f"pod-{i}", f"cid{i}") for i, ns in enumerate(pods)))
        ips = [r["ips"][0]["address"].split("/")[0] for r in results]
        assert len(set(ips)) == 20
        for ns, ip in zip(pods, ips):
            assert h.lab.ping(h.node.ns, ip), f"{ip} in {ns} unreachable"
        assert len([c for c in h.registry.calls if c[0] == "register"]) == 20

        # Agent restart: a new IPAM on the same state dir and a new service see everything.
        await h.stop()
        await h.start()
        assert sorted(a.ip for a in h.ipam.allocations()) == sorted(ips)
        # GC after the restart: ten pods are gone from the runtime's view.
        valid = [{"containerID": f"cid{i}", "ifname": "eth0"} for i in range(10)]
        gc = {"command": "GC", "config": {**CONF, "cni.dev/valid-attachments": valid}}
        await asyncio.get_running_loop().run_in_executor(h.clients, h._call, gc, None)
        assert sorted(a.container_id for a in h.ipam.allocations()) == sorted(f"cid{i}" for i in range(10))
        links = h.links(h.node.ns)
        for i in range(20):
            assert (host_iface_name("default", f"pod-{i}") in links) == (i < 10)
        # DEL without Kubernetes args (the runtime may omit them): IPAM's record names the veth.
        await asyncio.gather(*(h.call("DEL", ns, f"pod-{i}", f"cid{i}", send_fd=False, args=False)
                               for i, ns in enumerate(pods[:10])))
        assert h.ipam.allocations() == []
        assert "cali" not in h.links(h.node.ns)
        await h.stop()
    asyncio.run(body())


def test_late_del_of_a_replaced_sandbox_leaves_the_new_one_alone(harness):
    """A pod's veth name depends on namespace/pod only: when a sandbox is replaced and the
    old one's DEL arrives late, it frees the old address but keeps the new wiring."""
    h = harness
    old_ns, new_ns = h.lab.add_pod_ns("old"), h.lab.add_pod_ns("new")

    async def body():
        await h.start()
        await h.call("ADD", old_ns, "db-0", "sandbox-1")
        res = await h.call("ADD", new_ns, "db-0", "sandbox-2")  # replaces the stale veth
        new_ip = res["ips"][0]["address"].split("/")[0]
        await h.call("DEL", old_ns, "db-0", "sandbox-1", send_fd=False)
        assert [a.container_id for a in h.ipam.allocations()] == ["sandbox-2"]
        assert host_iface_name("default", "db-0") in h.links(h.node.ns)
        assert h.lab.ping(h.node.ns, new_ip)
        assert ("unregister", "default", "db-0") not in h.registry.calls
        await h.stop()
    asyncio.run(body())


def test_a_retried_add_racing_the_first_leaves_one_working_attachment(harness):
    h = harness
    pod_ns = h.lab.add_pod_ns("retry")

    async def body():
        await h.start()
        first, second = await asyncio.gather(h.call("ADD", pod_ns, "retry", "cid-r"),
                                             h.call("ADD", pod_ns, "retry", "cid-r"))
        assert first["ips"] == second["ips"]
        ip = first["ips"][0]["address"].split("/")[0]
        assert len(h.ipam.allocations()) == 1
        assert h.links(h.node.ns).count("cali") == 1
        assert h.lab.ping(h.node.ns, ip)
        assert len(h.service._veth_locks) == 0  # per-veth locks do not pile up
        await h.stop()
    asyncio.run(body())
