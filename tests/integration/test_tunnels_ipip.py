"""IPIP: detection of the kernel module (a real assertion either way), and the data path
between pods, which skips with the detector's own reason on kernels without ipip."""
from __future__ import annotations

import pytest

from felix_agent.calc.routes import local_block_routes, remote_routes
from felix_agent.dataplane.tunnels import IpipDevice, KernelModuleMissing
from felix_agent.model import BlockAffinity, IPPool, Node
from tests.integration.test_routing_support import program_routes, wire_pod
from tests.lab import kernel_has

pytestmark = pytest.mark.root


def test_detection_matches_the_kernel(make_lab):
    lab = make_lab(1)
    ns = lab.nodes[0].ns
    has_ipip = kernel_has("ipip", lambda *a, **kw: lab.exec(ns, *a, **kw))
    dev = IpipDevice(netns=ns)
    dev.set_desired("10.65.1.0")
    if has_ipip:
        assert dev.available()
        assert dev.apply()
        assert "inet 10.65.1.0/32" in lab.exec(ns, "ip", "addr", "show", "tunl0").stdout
        assert dev.apply() == []
    else:
        assert not dev.available()
        with pytest.raises(KernelModuleMissing, match="kernel module ipip is not available") as e:
            dev.apply()
        assert e.value.module == "ipip"
        # the probe left nothing behind
        links = lab.exec(ns, "ip", "-o", "link", "show").stdout
        assert "tortieprobe0" not in links and "tunl0" not in links


def test_pods_over_ipip(make_lab):
    lab = make_lab(2, two_subnets=True)
    devs = []
    for i, n in enumerate(lab.nodes, 1):
        dev = IpipDevice(netns=n.ns)
        dev.set_desired(f"10.65.{i}.0")
        try:
            dev.apply()
        except KernelModuleMissing as e:
            pytest.skip(str(e))
        devs.append(dev)
    pools = [IPPool("ip", "10.65.0.0/16", mode="ipip")]
    nodes = [Node(n.name, n.cidr, ipip_tunnel_addr=f"10.65.{i}.0") for i, n in enumerate(lab.nodes, 1)]
    blocks = [BlockAffinity(f"10.65.{i}.0/26", n.name) for i, n in enumerate(lab.nodes, 1)]
    for n in lab.nodes:
        program_routes(lab, n.ns, remote_routes(nodes, pools, blocks, n.name)
                       | local_block_routes(nodes, pools, blocks, n.name))
    pods = [wire_pod(lab, n.ns, f"ipip{i}", f"10.65.{i}.2") for i, n in enumerate(lab.nodes, 1)]
    assert lab.ping(pods[0].ns, pods[1].ip)
