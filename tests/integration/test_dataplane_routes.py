"""RouteDriver against the kernel's routing table inside a lab node namespace."""
import threading

import pytest

from felix_agent.calc.desired import Route
from felix_agent.dataplane.routes import RouteDriver

pytestmark = pytest.mark.root

REMOTE = Route("10.65.2.0/26", dev="eth0", gateway="192.168.100.12", onlink=True)
BLACKHOLE = Route("10.65.1.0/26", type="blackhole")
UNREACH = Route("10.65.3.0/26", type="unreachable")
DEVROUTE = Route("10.65.4.0/26", dev="eth0", scope="link")
VIA = Route("10.65.5.0/26", gateway="192.168.100.13")  # the kernel picks the device
V6 = Route("2001:db8:65::/64", type="unreachable")


@pytest.fixture
def node(make_lab):
    lab = make_lab(1)
    return lab, lab.nodes[0].ns


def routes(lab, ns, v=4):
    return lab.exec(ns, "ip", f"-{v}", "route", "show", "table", "main").stdout


def proto80(lab, ns, v=4):
    return sorted(line.strip() for line in routes(lab, ns, v).splitlines() if "proto 80" in line)


def test_add_replace_delete(node):
    lab, ns = node
    d = RouteDriver(netns=ns)
    d.set_desired(frozenset({REMOTE, BLACKHOLE, UNREACH, DEVROUTE, VIA, V6}))
    ch = d.apply()
    assert sorted(ch.added) == sorted(r.dst for r in (REMOTE, BLACKHOLE, UNREACH, DEVROUTE, VIA, V6))
    assert not ch.failed and not ch.conflicts
    assert proto80(lab, ns) == sorted([
        "blackhole 10.65.1.0/26 proto 80", "unreachable 10.65.3.0/26 proto 80",
        "10.65.2.0/26 via 192.168.100.12 dev eth0 proto 80 onlink",
        "10.65.4.0/26 dev eth0 proto 80 scope link", "10.65.5.0/26 via 192.168.100.13 dev eth0 proto 80"])
    assert "unreachable 2001:db8:65::/64 dev lo proto 80" in routes(lab, ns, 6)
    assert not d.apply()

    moved = Route(REMOTE.dst, dev="eth0", gateway="192.168.100.14", onlink=True)
    now_unicast = Route(BLACKHOLE.dst, dev="eth0", scope="link")
    d.set_desired(frozenset({moved, now_unicast, DEVROUTE}))
    ch = d.apply()
    assert sorted(ch.replaced) == sorted([REMOTE.dst, BLACKHOLE.dst])
    assert sorted(ch.deleted) == sorted([UNREACH.dst, VIA.dst, V6.dst])
    assert sorted(proto80(lab, ns)) == sorted([
        "10.65.1.0/26 dev eth0 proto 80 scope link",
        "10.65.2.0/26 via 192.168.100.14 dev eth0 proto 80 onlink",
        "10.65.4.0/26 dev eth0 proto 80 scope link",
    ])
    assert proto80(lab, ns, 6) == []
    d.set_desired(frozenset())
    assert len(d.apply().deleted) == 3
    assert proto80(lab, ns) == []


def test_drift_repair(node):
    lab, ns = node
    d = RouteDriver(netns=ns)
    d.set_desired(frozenset({REMOTE, BLACKHOLE}))
    d.apply()
    lab.exec(ns, "ip", "route", "del", REMOTE.dst)
    lab.exec(ns, "ip", "route", "replace", BLACKHOLE.dst, "dev", "eth0", "proto", "80")
    lab.exec(ns, "ip", "route", "add", "10.65.9.0/26", "dev", "eth0", "proto", "80")  # ours by proto
    ch = d.apply()
    assert ch.added == [REMOTE.dst] and ch.replaced == [BLACKHOLE.dst] and ch.deleted == ["10.65.9.0/26"]
    assert sorted(proto80(lab, ns)) == sorted([
        "10.65.2.0/26 via 192.168.100.12 dev eth0 proto 80 onlink", "blackhole 10.65.1.0/26 proto 80"])
    assert not d.apply()


def test_foreign_routes_untouched(node):
    lab, ns = node
    lab.exec(ns, "ip", "route", "add", "10.66.0.0/24", "via", "192.168.100.1", "proto", "static")
    lab.exec(ns, "ip", "route", "add", "10.65.1.0/26", "dev", "eth0", "proto", "bird")
    lab.exec(ns, "ip", "route", "add", "10.67.0.5", "dev", "eth0", "scope", "link")  # like a CNI pod route
    before = routes(lab, ns)
    d = RouteDriver(netns=ns)
    # 10.65.1.0/26 is BIRD's: a conflict, reported, not overwritten.
    d.set_desired(frozenset({BLACKHOLE, REMOTE}))
    ch = d.apply()
    assert ch.added == [REMOTE.dst] and list(ch.conflicts) == [BLACKHOLE.dst] and "proto 12" in ch.conflicts[BLACKHOLE.dst]
    d.set_desired(frozenset())
    assert d.apply().deleted == [REMOTE.dst]
    assert routes(lab, ns) == before
    assert "10.66.0.0/24 via 192.168.100.1 dev eth0 proto static" in before


def test_missing_device_is_reported_then_programmed(node):
    lab, ns = node
    d = RouteDriver(netns=ns)
    later = Route("10.65.7.0/26", dev="vxlan.calico", gateway="10.65.7.1", onlink=True)
    d.set_desired(frozenset({later, BLACKHOLE}))
    ch = d.apply()
    assert ch.added == [BLACKHOLE.dst] and "vxlan.calico" in ch.failed[later.dst]
    lab.exec(ns, "ip", "link", "add", "vxlan.calico", "type", "veth", "peer", "name", "vxp")
    ch = d.apply()  # it exists but is down: the kernel's refusal is reported
    assert "Network is down" in ch.failed[later.dst]
    lab.exec(ns, "ip", "link", "set", "vxlan.calico", "up")
    assert d.apply().added == [later.dst]
    assert "10.65.7.0/26 via 10.65.7.1 dev vxlan.calico proto 80 onlink" in routes(lab, ns)


def test_apply_from_worker_threads(node):
    lab, ns = node
    d = RouteDriver(netns=ns)
    d.set_desired(frozenset({REMOTE, BLACKHOLE, V6}))
    results, errors = [], []

    def work():
        try:
            results.append(d.apply())
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(len(r.added) for r in results) == 3  # exactly one thread did the work
    assert len(proto80(lab, ns)) == 2


def test_missing_namespace_is_an_error_and_not_created(node):
    d = RouteDriver(netns="tortie-no-such-ns")
    with pytest.raises(RuntimeError, match="tortie-no-such-ns"):
        d.apply()
    import os
    assert not os.path.exists("/var/run/netns/tortie-no-such-ns")


def test_apply_in_the_agents_executor_while_a_loop_runs(node):
    """The agent calls apply() through loop.run_in_executor; pyroute2 must not trip over
    the running event loop of the main thread."""
    import asyncio
    import concurrent.futures
    lab, ns = node
    d = RouteDriver(netns=ns)
    d.set_desired(frozenset({BLACKHOLE}))

    async def main():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return [await loop.run_in_executor(pool, d.apply) for _ in range(2)]
    first, second = asyncio.run(main())
    assert first.added == [BLACKHOLE.dst] and not second
    assert proto80(lab, ns) == ["blackhole 10.65.1.0/26 proto 80"]
