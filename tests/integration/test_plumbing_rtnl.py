"""podnet.plumbing on its own rtnetlink client (podnet/rtnl.py), called in-process
from a thread inside a lab node's namespace, as the agent's workers call it.  What the
kernel ends up with is read back with `ip -j`, so a wrong field in a hand-packed message
shows up as a wrong address, route, MAC, MTU or flag."""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager

import pytest

from podnet import nsutil, plumbing
from podnet.errors import DATAPLANE_FAILURE, INVALID_CONFIG, CNIError
from podnet.rtnl import NetlinkError, Rtnl

pytestmark = pytest.mark.root

HOST = "calirtnltest1"


@contextmanager
def in_node(node_ns: str):
    """Run the body with this thread inside the node namespace (the plumbing's host side)."""
    fd = os.open(f"/var/run/netns/{node_ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with nsutil.entered(fd):
            yield
    finally:
        os.close(fd)


def ipj(lab, ns: str, *args: str) -> list[dict]:
    return json.loads(lab.exec(ns, "ip", "-j", *args).stdout or "[]")


def routes(lab, ns: str, family: str = "-4") -> list[tuple]:
    """(dst, gateway, dev, scope, protocol) of the main table; ip prints no protocol for
    `boot` (what an admin's `ip route add` makes) and no scope for universe."""
    return sorted((r["dst"], r.get("gateway", ""), r["dev"], r.get("scope", "global"), r.get("protocol", "boot"))
                  for r in ipj(lab, ns, family, "route", "show", "table", "main"))


def link(lab, ns: str, name: str) -> dict | None:
    found = [x for x in ipj(lab, ns, "-d", "link") if x["ifname"] == name]
    return found[0] if found else None


def addrs(lab, ns: str, name: str) -> list[tuple]:
    (ln,) = ipj(lab, ns, "addr", "show", "dev", name)
    return sorted((a["family"], a["local"], a["prefixlen"], bool(a.get("nodad"))) for a in ln["addr_info"]
                  if a.get("scope") != "link")


def sysctl(lab, ns: str, rel: str) -> str:
    return lab.exec(ns, "cat", f"/proc/sys/net/{rel}").stdout.strip()


@pytest.fixture
def node(make_lab):
    lab = make_lab(1)
    return lab, lab.nodes[0]


def test_setup_v4_gives_exactly_the_documented_layout(node):
    lab, n = node
    pod = lab.add_pod_ns("v4")
    with in_node(n.ns):
        info = plumbing.setup(pod, "eth0", HOST, ["10.77.0.5/32"], mtu=1400)
    assert info == {"host_mac": "ee:ee:ee:ee:ee:ee", "container_mac": info["container_mac"], "host_ifname": HOST,
                    "sandbox": f"/var/run/netns/{pod}"}

    # Pod side: MTU, the MAC setup() reported, up, the peer of the host end, the /32 and
    # exactly the two routes.
    eth0 = link(lab, pod, "eth0")
    host = link(lab, n.ns, HOST)
    assert eth0["mtu"] == 1400 and eth0["address"] == info["container_mac"] and eth0["operstate"] == "UP"
    assert eth0["linkinfo"]["info_kind"] == "veth" and eth0["link_index"] == host["ifindex"]
    assert addrs(lab, pod, "eth0") == [("inet", "10.77.0.5", 32, False)]
    assert routes(lab, pod) == [("169.254.1.1", "", "eth0", "link", "boot"),
                                ("default", "169.254.1.1", "eth0", "global", "boot")]

    # Host side: the fixed MAC, MTU, up, the scope-link /32 route, the sysctls.
    assert host["address"] == "ee:ee:ee:ee:ee:ee" and host["mtu"] == 1400 and host["operstate"] == "UP"
    assert host["linkinfo"]["info_kind"] == "veth"
    assert ("10.77.0.5", "", HOST, "link", "boot") in routes(lab, n.ns)
    for rel, value in plumbing.HOST_SYSCTLS_V4:
        assert sysctl(lab, n.ns, rel.format(**{"if": HOST})) == value, rel

    # Real packets both ways (proxy ARP answers for 169.254.1.1).
    assert lab.ping(n.ns, "10.77.0.5") and lab.ping(pod, n.ip)
    with in_node(n.ns):
        plumbing.check(pod, "eth0", HOST, ["10.77.0.5/32"])  # pyroute2's view agrees


def test_setup_dual_stack(node):
    lab, n = node
    pod = lab.add_pod_ns("ds")
    with in_node(n.ns):
        plumbing.setup(pod, "eth0", HOST, ["10.77.0.6/32", "fd77::6/128"], mtu=1450)
    # v6 without duplicate address detection (usable at once), v6 default via the host
    # end's link-local address (the EUI-64 of ee:ee:ee:ee:ee:ee).
    assert addrs(lab, pod, "eth0") == [("inet", "10.77.0.6", 32, False), ("inet6", "fd77::6", 128, True)]
    assert ("default", "fe80::ecee:eeff:feee:eeee", "eth0", "global", "boot") in routes(lab, pod, "-6")
    assert ("fd77::6", "", HOST, "global", "boot") in routes(lab, n.ns, "-6")
    assert ("10.77.0.6", "", HOST, "link", "boot") in routes(lab, n.ns)
    for rel, value in plumbing.HOST_SYSCTLS_V4 + plumbing.HOST_SYSCTLS_V6:
        assert sysctl(lab, n.ns, rel.format(**{"if": HOST})) == value, rel
    assert sysctl(lab, pod, "ipv6/conf/eth0/disable_ipv6") == "0"
    assert lab.ping(n.ns, "fd77::6") and lab.ping(n.ns, "10.77.0.6")
    with in_node(n.ns):
        plumbing.check(pod, "eth0", HOST, ["10.77.0.6/32", "fd77::6/128"])


def _nothing_left(lab, node_ns: str, pod: str) -> None:
    assert link(lab, node_ns, HOST) is None
    assert not [r for r in routes(lab, node_ns) + routes(lab, node_ns, "-6") if r[2] == HOST]


def test_existing_interface_in_the_pod_is_refused_and_left_alone(node):
    lab, n = node
    pod = lab.add_pod_ns("busy")
    lab.exec(pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    with in_node(n.ns), pytest.raises(CNIError) as e:
        plumbing.setup(pod, "eth0", HOST, ["10.77.0.7/32"])
    assert e.value.code == DATAPLANE_FAILURE and "interface eth0 already exists" in e.value.msg
    _nothing_left(lab, n.ns, pod)
    assert link(lab, pod, "eth0")["linkinfo"]["info_kind"] == "veth"  # not ours: untouched


def test_a_kernel_refusal_half_way_rolls_everything_back(node):
    """The veth, sysctls and addresses exist when the pod's default route is refused (the
    pod namespace already has one): everything goes, the pod's own route stays."""
    lab, n = node
    pod = lab.add_pod_ns("half")
    lab.exec(pod, "ip", "route", "add", "default", "dev", "lo")
    with in_node(n.ns), pytest.raises(CNIError) as e:
        plumbing.setup(pod, "eth0", HOST, ["10.77.0.8/32"])
    assert e.value.code == DATAPLANE_FAILURE and e.value.msg == f"wiring {HOST}/eth0 failed: File exists"
    _nothing_left(lab, n.ns, pod)
    assert link(lab, pod, "eth0") is None
    assert routes(lab, pod) == [("default", "", "lo", "link", "boot")]


def test_an_mtu_ipv6_cannot_use_is_refused_before_anything_is_made(node):
    """Below 1280 the kernel disables IPv6 on a link: a dual-stack pod with such an MTU is a
    config error, said plainly, and nothing is made."""
    lab, n = node
    pod = lab.add_pod_ns("mtu")
    with in_node(n.ns), pytest.raises(CNIError) as e:
        plumbing.setup(pod, "eth0", HOST, ["10.77.0.9/32", "fd77::9/128"], mtu=1000)
    assert e.value.code == INVALID_CONFIG and "below 1280, the IPv6 minimum" in e.value.msg
    _nothing_left(lab, n.ns, pod)
    assert link(lab, pod, "eth0") is None


def test_veth_creation_refused_by_the_kernel_names_the_veth(node):
    lab, n = node
    pod = lab.add_pod_ns("bad")
    with in_node(n.ns), pytest.raises(CNIError) as e:
        plumbing.setup(pod, "eth0", "cali/bad", ["10.77.0.10/32"])  # '/' is not allowed in a name
    assert e.value.msg == "cannot create veth cali/bad/eth0: Invalid argument"
    assert link(lab, pod, "eth0") is None


def test_teardown_is_idempotent_and_survives_a_vanished_namespace(node):
    lab, n = node
    pod = lab.add_pod_ns("td")
    with in_node(n.ns):
        plumbing.setup(pod, "eth0", HOST, ["10.77.0.11/32"])
        plumbing.teardown(pod, "eth0", HOST)
        _nothing_left(lab, n.ns, pod)
        assert link(lab, pod, "eth0") is None
        plumbing.teardown(pod, "eth0", HOST)
        plumbing.teardown(None, "eth0", HOST)
        plumbing.teardown("/var/run/netns/does-not-exist", "eth0", HOST)


def test_teardown_without_the_host_end_removes_only_a_veth_in_the_pod(node):
    lab, n = node
    pod = lab.add_pod_ns("orphan")
    lab.exec(pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x0")
    lab.exec(pod, "ip", "link", "add", "eth1", "type", "bridge")
    with in_node(n.ns):
        plumbing.teardown(pod, "eth0", HOST)
        plumbing.teardown(pod, "eth1", HOST)
    assert link(lab, pod, "eth0") is None and link(lab, pod, "x0") is None
    assert link(lab, pod, "eth1") is not None


def test_retire_then_reap(node):
    """retire(): one request takes the host end down, renames it and moves it to the
    retired group.  The pod is cut off at once, the name is free for the next sandbox of
    the same pod, and reap_retired() deletes only retired links."""
    lab, n = node
    old, new, other = lab.add_pod_ns("r-old"), lab.add_pod_ns("r-new"), lab.add_pod_ns("r-other")
    # Bystanders: another pod's veth, and a link in another (non-default) group.
    lab.exec(n.ns, "ip", "link", "add", "keep0", "type", "veth", "peer", "name", "keep1")
    lab.exec(n.ns, "ip", "link", "set", "keep0", "group", "7")
    lab.exec(n.ns, "ip", "link", "add", "calibridge", "type", "bridge")
    with in_node(n.ns):
        plumbing.setup(old, "eth0", HOST, ["10.77.0.12/32", "fd77::12/128"])
        plumbing.setup(other, "eth0", "calirtnlother", ["10.77.0.13/32"])
        index = link(lab, n.ns, HOST)["ifindex"]

        assert plumbing.retire(HOST) is True
        retired = link(lab, n.ns, f"{plumbing.RETIRED_PREFIX}{index:x}")
        assert retired is not None and retired["ifindex"] == index and link(lab, n.ns, HOST) is None
        assert retired["group"] == str(plumbing.RETIRED_GROUP) and "UP" not in retired["flags"]
        # The kernel dropped the host routes through the downed device at once: the IPv4
        # one always (fib flushes a device's routes when it goes down); on this kernel
        # (6.x) the IPv6 one too, measured.
        assert not [r for r in routes(lab, n.ns) if r[0] == "10.77.0.12"]
        assert not [r for r in routes(lab, n.ns, "-6") if r[0] == "fd77::12"]
        # The pod's end lost carrier: nothing it sends goes anywhere.
        pod_end = link(lab, old, "eth0")
        assert "NO-CARRIER" in pod_end["flags"] and pod_end["operstate"] != "UP"
        assert not lab.ping(n.ns, "10.77.0.12", timeout=1)

        # A new sandbox of the same pod gets the name and the address straight away.
        plumbing.setup(new, "eth0", HOST, ["10.77.0.12/32", "fd77::12/128"])
        assert lab.ping(n.ns, "10.77.0.12")

        # Idempotent, and only veths: no such link, or not a veth, is not retired.
        assert plumbing.retire("calinosuchlink") is False
        assert plumbing.retire("calibridge") is False

        assert plumbing.reap_retired() == 1
        assert link(lab, n.ns, f"{plumbing.RETIRED_PREFIX}{index:x}") is None
        assert plumbing.reap_retired() == 0
    names = {x["ifname"] for x in ipj(lab, n.ns, "link")}
    assert {HOST, "calirtnlother", "keep0", "keep1", "calibridge", "eth0"} <= names
    assert link(lab, n.ns, "keep0")["group"] == "7"
    assert lab.ping(n.ns, "10.77.0.12") and lab.ping(n.ns, "10.77.0.13")


def test_reap_deletes_many_retired_links_in_one_request(node):
    lab, n = node
    pods = [lab.add_pod_ns(f"m{i}") for i in range(5)]
    with in_node(n.ns):
        for i, p in enumerate(pods):
            plumbing.setup(p, "eth0", f"calirtnlm{i}", [f"10.77.1.{i + 1}/32"])
        assert all(plumbing.retire(f"calirtnlm{i}") for i in range(5))
        assert plumbing.retire("calirtnlm0") is False  # already retired: the name is gone
        assert plumbing.reap_retired() == 5
    assert not [x for x in ipj(lab, n.ns, "link") if x["ifname"].startswith(plumbing.RETIRED_PREFIX)]
    for p in pods:
        assert link(lab, p, "eth0") is None  # the peers went with them


def test_rtnl_errors_carry_the_kernels_errno_and_text(node):
    lab, n = node
    with in_node(n.ns), Rtnl() as nl:
        assert nl.link("nosuchlink0") is None
        lo = nl.link("lo")
        assert lo.index == 1 and lo.kind is None and lo.up
        with pytest.raises(NetlinkError) as e:
            nl.del_link(99999)
        assert e.value.errno == errno.ENODEV and e.value.strerror == "No such device"
        with pytest.raises(NetlinkError) as e:
            nl.del_group(plumbing.RETIRED_GROUP)
        assert e.value.errno == errno.ENODEV
        # The socket stays usable after an error: replies are matched by sequence number.
        assert {x.name for x in nl.links()} >= {"lo", "eth0"}


def test_add_and_del_in_a_fresh_interpreter_import_no_pyroute2(node):
    """The no-agent binary's ADD/DEL path, in a new process like the binary (no site), run
    inside the node namespace: a whole setup and teardown, and pyroute2 never loaded."""
    import sys

    lab, n = node
    pod = lab.add_pod_ns("fresh")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {root!r})\n"
            "from podnet import plumbing\n"
            f"plumbing.setup({pod!r}, 'eth0', {HOST!r}, ['10.77.2.1/32', 'fd77::2:1/128'])\n"
            f"plumbing.teardown({pod!r}, 'eth0', {HOST!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'asyncio')))\n")
    out = lab.exec(n.ns, sys.executable, "-S", "-E", "-c", code).stdout
    assert out.strip() == "[]"
    _nothing_left(lab, n.ns, pod)


def test_add_again_in_the_same_namespace_right_after_retire(node):
    """A runtime retrying ADD in the netns it has just DELeted: the pod's eth0 is still the
    far end of the retired (not yet reaped) veth.  setup() deletes that retired veth and
    wires the pod, as it could when DEL deleted synchronously; a foreign eth0 still fails."""
    lab, n = node
    pod = lab.add_pod_ns("again")
    with in_node(n.ns):
        plumbing.setup(pod, "eth0", HOST, ["10.77.3.1/32"])
        assert plumbing.retire(HOST)
        info = plumbing.setup(pod, "eth0", HOST, ["10.77.3.1/32"])
        assert plumbing.reap_retired() == 0  # the old one went during setup
    assert link(lab, pod, "eth0")["address"] == info["container_mac"]
    assert lab.ping(n.ns, "10.77.3.1")
