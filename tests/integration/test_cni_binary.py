"""The CNI plugin driven the way a runtime drives it: env + stdin, inside the node's
namespace, CNI_NETNS=/var/run/netns/<pod ns>, host-local IPAM with a per-test dataDir.
Runs the built dist/tortie and `python -m cni_plugin`."""
import os
import sys
import json

import pytest

from podnet.naming import host_iface_name
from podnet.versions import SUPPORTED_VERSIONS
from tests.lab import sh

from tests.integration.test_cni_helpers import Net, make_net, pod_ip, runner, tortie_binary  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root


def sysctl(net: Net, path: str) -> str:
    return net.lab.exec(net.node_ns, "cat", f"/proc/sys/net/{path}").stdout.strip()


def test_add_check_del(make_lab, tmp_path, runner):
    lab = make_lab(1)
    node = lab.nodes[0]
    pod = lab.add_pod_ns("web")
    net = make_net(lab, tmp_path, runner)
    att, res = net.add(pod, "web")
    cali = host_iface_name("default", "web")

    # The result, in the config's version (1.0.0: no "version" on ips).
    assert res["cniVersion"] == "1.0.0"
    assert res["interfaces"][0] == {"name": cali, "mac": "ee:ee:ee:ee:ee:ee"}
    assert res["interfaces"][1]["name"] == "eth0" and res["interfaces"][1]["sandbox"] == f"/var/run/netns/{pod}"
    ip = pod_ip(res)
    assert res["ips"] == [{"interface": 1, "address": f"{ip}/32"}]
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]

    # Inside the pod: the /32, the two routes exactly, the MTU, the MAC the result names.
    assert [r.strip() for r in lab.exec(pod, "ip", "-4", "route").stdout.splitlines()] == [
        "default via 169.254.1.1 dev eth0", "169.254.1.1 dev eth0 scope link"]
    link = lab.exec(pod, "ip", "-o", "link", "show", "eth0").stdout
    assert "mtu 1450" in link and res["interfaces"][1]["mac"] in link
    assert f"inet {ip}/32 " in lab.exec(pod, "ip", "-o", "-4", "addr", "show", "eth0").stdout

    # On the node: the host route, the MAC, the sysctls.
    assert f"{ip} dev {cali} scope link" in [r.strip() for r in lab.exec(node.ns, "ip", "route").stdout.splitlines()]
    assert "link/ether ee:ee:ee:ee:ee:ee" in lab.exec(node.ns, "ip", "link", "show", cali).stdout
    assert sysctl(net, f"ipv4/conf/{cali}/proxy_arp") == "1"
    assert sysctl(net, f"ipv4/neigh/{cali}/proxy_delay") == "0"
    assert sysctl(net, f"ipv4/conf/{cali}/forwarding") == "1"
    assert sysctl(net, f"ipv4/conf/{cali}/route_localnet") == "0"

    # Real packets both ways.
    assert lab.ping(node.ns, ip) and lab.ping(pod, node.ip)
    assert net.allocated() == [ip] and len(net.records()) == 1

    # CHECK passes; after the host route is removed by hand it fails, naming the route.
    check_conf = net.conf(prevResult=res)
    r = net.run("CHECK", att, check_conf)
    assert r.ok, r.stdout
    lab.exec(node.ns, "ip", "route", "del", f"{ip}/32", "dev", cali)
    r = net.run("CHECK", att, check_conf)
    assert r.returncode != 0
    assert r.output["code"] == 100 and f"host route {ip}/32 dev {cali} is missing" in r.output["msg"]

    # DEL, twice: both succeed, nothing is left.
    for _ in range(2):
        r = net.run("DEL", att)
        assert r.ok and r.stdout == "", r.stdout
    net.assert_nothing_left()
    assert lab.exec(pod, "ip", "-o", "link", "show").stdout.count("eth0") == 0
    assert "ADD c-web/eth0 ok" in open(net.log_file).read()


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_result_in_the_requested_version(make_lab, tmp_path, tortie_binary, version):
    lab = make_lab(1)
    pod = lab.add_pod_ns("v")
    net = make_net(lab, tmp_path, [tortie_binary], version=version)
    att, res = net.add(pod, "v")
    assert res["cniVersion"] == version
    legacy = version.startswith("0.")
    assert ("version" in res["ips"][0]) == legacy
    if legacy:
        assert res["ips"][0]["version"] == "4"
    assert ("mtu" in res["interfaces"][1]) == (version == "1.1.0")
    assert net.run("DEL", att).ok
    net.assert_nothing_left()


def test_del_after_the_netns_vanished(make_lab, tmp_path, tortie_binary):
    lab = make_lab(1)
    pod = lab.add_pod_ns("gone")
    net = make_net(lab, tmp_path, [tortie_binary])
    att, res = net.add(pod, "gone")
    sh("ip", "netns", "del", pod)
    r = net.run("DEL", att)
    assert r.ok, r.stdout
    net.assert_nothing_left()
    # And once more without CNI_NETNS at all (the spec allows that for DEL).
    att.netns = ""
    assert net.run("DEL", att).ok


def test_dual_stack(make_lab, tmp_path, tortie_binary):
    lab = make_lab(1)
    node = lab.nodes[0]
    pod = lab.add_pod_ns("ds")
    net = make_net(lab, tmp_path, [tortie_binary], subnet6="fd00:10:244:1::/64", version="1.1.0")
    att, res = net.add(pod, "ds")
    ip4, ip6 = pod_ip(res, 4), pod_ip(res, 6)
    cali = host_iface_name("default", "ds")
    assert {"interface": 1, "address": f"{ip6}/128"} in res["ips"]
    assert {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"} in res["routes"]
    assert f"inet6 {ip6}/128 " in lab.exec(pod, "ip", "-o", "-6", "addr", "show", "eth0").stdout
    assert "default via fe80::ecee:eeff:feee:eeee dev eth0" in lab.exec(pod, "ip", "-6", "route").stdout
    assert f"{ip6} dev {cali}" in lab.exec(node.ns, "ip", "-6", "route").stdout
    assert "fe80::ecee:eeff:feee:eeee/64" in lab.exec(node.ns, "ip", "-6", "addr", "show", cali).stdout
    assert sysctl(net, f"ipv6/conf/{cali}/proxy_ndp") == "1"
    assert sysctl(net, f"ipv6/conf/{cali}/accept_ra") == "0"
    assert sysctl(net, f"ipv6/conf/{cali}/forwarding") == "1"
    assert lab.ping(node.ns, ip4)
    p = lab.exec(node.ns, "ping", "-6", "-n", "-c", "1", "-W", "2", ip6, check=False)
    assert p.returncode == 0, p.stdout
    assert net.run("CHECK", att, net.conf(prevResult=res)).ok
    assert net.run("DEL", att).ok
    net.assert_nothing_left()


def test_gc_removes_attachments_not_in_the_valid_list(make_lab, tmp_path, runner):
    lab = make_lab(1)
    node = lab.nodes[0]
    keep_ns, stale_ns = lab.add_pod_ns("keep"), lab.add_pod_ns("stale")
    net = make_net(lab, tmp_path, runner, version="1.1.0")
    keep, keep_res = net.add(keep_ns, "keep")
    stale, stale_res = net.add(stale_ns, "stale")
    stale_ip = pod_ip(stale_res)
    assert len(net.cali_links()) == 2 and len(net.allocated()) == 2

    gc = net.conf(**{"cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]})
    r = net.run("GC", None, gc)
    assert r.ok and r.stdout == "", r.stdout
    assert net.cali_links() == [host_iface_name("default", "keep")]
    assert net.allocated() == [pod_ip(keep_res)]
    assert stale_ip not in lab.exec(node.ns, "ip", "route").stdout
    assert net.records() == [f"{keep.container_id}@eth0.json"]
    # The valid one is untouched.
    assert lab.ping(node.ns, pod_ip(keep_res))
    assert net.run("CHECK", keep, net.conf(prevResult=keep_res)).ok
    assert net.run("DEL", keep).ok
    net.assert_nothing_left()


def test_version_and_status(make_lab, tmp_path, runner):
    lab = make_lab(1)
    net = make_net(lab, tmp_path, runner, version="1.1.0")
    r = net.run("VERSION", None, {"cniVersion": "1.0.0"})
    assert r.ok and r.output == {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    r = net.run("STATUS", None)
    assert r.ok and r.stdout == ""
    r = net.run("STATUS", None, net.conf(ipam={"type": "no-such-ipam"}))
    assert r.returncode != 0 and r.output["code"] == 50
    assert json.dumps(r.output)  # the error is JSON


def test_the_bundle_leaves_out_what_would_slow_every_start(tortie_binary):
    """PyInstaller's bootstrap imports ctypes at every start when the bundle holds the
    package (~1.6 ms a call), and pyroute2 is not needed since the plumbing speaks netlink
    itself (podnet/rtnl.py).  setns goes through the _ctypes extension, which must be
    there: test_add_check_del runs the built binary's own plumbing through it."""
    internal = os.path.join(os.path.dirname(os.path.realpath(tortie_binary)), "_internal")
    names = set(os.listdir(internal))
    assert "ctypes" not in names and "pyroute2" not in names, sorted(names & {"ctypes", "pyroute2"})
    dynload = os.listdir(os.path.join(internal, f"python{sys.version_info[0]}.{sys.version_info[1]}", "lib-dynload"))
    assert any(n.startswith("_ctypes.") for n in dynload)
