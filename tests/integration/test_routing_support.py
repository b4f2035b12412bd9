"""Shared pieces of the routing tests (BGP, VXLAN, IPIP): hand-wired pods, programming
calc Route records with `ip route`, BIRD daemons per lab node, and polling.

Pods are wired the way the CNI plugin does it (veth `cali...` with MAC ee:ee:ee:ee:ee:ee
and proxy ARP on the node, `<ip>/32` + `default via 169.254.1.1` in the pod, `<ip> dev
cali... scope link` on the node), kept small on purpose: these tests are about routing
between nodes, and the real plugin is tested on its own.  The one test here checks that
a hand-wired pod reaches its own node, so the other tests can rely on it.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass

import pytest

from felix_agent.dataplane.bird import BirdDaemon
from felix_agent.calc.desired import Route
from tests.lab import Lab

pytestmark = pytest.mark.root


@dataclass
class Pod:
    ns: str
    ip: str
    node_ns: str
    host_iface: str


def wire_pod(lab: Lab, node_ns: str, name: str, ip: str) -> Pod:
    ns = lab.add_pod_ns(name)
    host = "cali" + hashlib.sha1(f"test.{name}".encode()).hexdigest()[:11]
    lab.exec(node_ns, "ip", "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns)
    lab.exec(node_ns, "ip", "link", "set", host, "address", "ee:ee:ee:ee:ee:ee", "up")
    lab.exec(node_ns, "sysctl", "-qw", f"net.ipv4.conf.{host}.proxy_arp=1",
             f"net.ipv4.neigh.{host}.proxy_delay=0")
    lab.exec(ns, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
    lab.exec(ns, "ip", "link", "set", "eth0", "up")
    lab.exec(ns, "ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    lab.exec(ns, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    lab.exec(node_ns, "ip", "route", "add", ip, "dev", host, "scope", "link")
    return Pod(ns=ns, ip=ip, node_ns=node_ns, host_iface=host)


def route_argv(r: Route) -> list[str]:
    """`ip route replace` arguments for a calc Route (the tests' stand-in for the
    RouteDriver, so these tests do not depend on another part being ready)."""
    argv = ["ip", "route", "replace"]
    if r.type != "unicast":
        return [*argv, r.type, r.dst]
    argv.append(r.dst)
    if r.gateway:
        argv += ["via", r.gateway]
    if r.dev:
        argv += ["dev", r.dev]
    if r.onlink:
        argv.append("onlink")
    if r.scope != "universe":
        argv += ["scope", r.scope]
    if r.src:
        argv += ["src", r.src]
    return argv + ["proto", "80"]


def program_routes(lab: Lab, ns: str, routes) -> None:
    for r in sorted(routes, key=lambda r: r.dst):
        lab.exec(ns, *route_argv(r))


def wait_for(cond, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll until cond() is truthy and return its value; fail naming `what` otherwise.
    (Convergence waits, not timing asserts: the limit is generous.)"""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


class Birds:
    """One BirdDaemon per lab node, each with a short run dir (the control socket path
    must fit the 108-byte sun_path limit); all stopped and removed afterwards."""

    def __init__(self):
        self.daemons: dict[str, BirdDaemon] = {}
        self.dirs: list[str] = []

    def for_node(self, ns: str) -> BirdDaemon:
        if ns not in self.daemons:
            d = tempfile.mkdtemp(prefix="tortie-bird-")
            self.dirs.append(d)
            self.daemons[ns] = BirdDaemon(d, netns=ns)
        return self.daemons[ns]

    def close(self) -> None:
        for d in self.daemons.values():
            try:
                d.stop()
            except Exception:
                pass
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def birds():
    if shutil.which("bird") is None:
        pytest.fail("bird2 is not installed (run `make deps`)")
    b = Birds()
    yield b
    b.close()


def test_hand_wired_pod_reaches_its_node(make_lab):
    lab = make_lab(1)
    node = lab.nodes[0]
    pod = wire_pod(lab, node.ns, "a", "10.65.1.2")
    assert lab.ping(pod.ns, node.ip)
    assert lab.ping(node.ns, pod.ip)
    # and it does not reach an address nobody has (the probe can fail)
    assert not lab.ping(pod.ns, "10.65.9.9", timeout=1)
