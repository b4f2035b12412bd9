"""The route driver's pure parts: validation/normalisation and the plan."""
import pytest

from felix_agent.calc.desired import Route
from felix_agent.dataplane.routes import KernelRoute, RouteDriver, matches, normalize, plan

PROTO = 80


def kr(route, proto=PROTO, priority=0, version=4):
    return KernelRoute(route, proto, priority, version)


def test_normalize_canonical_forms():
    assert normalize(Route("10.0.0.1/32", dev="eth0")).dst == "10.0.0.1/32"
    assert normalize(Route("2001:0db8::/64", type="unreachable")).dst == "2001:db8::/64"
    r = normalize(Route("10.1.0.0/26", dev="eth0", gateway="192.168.100.12", onlink=True))
    assert r.gateway == "192.168.100.12" and r.onlink


@pytest.mark.parametrize("route,msg", [
    (Route("10.0.0.1/24", dev="eth0"), "host bits"),
    (Route("nope", dev="eth0"), "bad destination"),
    (Route("10.0.0.0/24"), "needs a dev or a gateway"),
    (Route("10.0.0.0/24", type="blackhole", dev="eth0"), "takes no dev"),
    (Route("10.0.0.0/24", type="multicast"), "type must be"),
    (Route("10.0.0.0/24", dev="eth0", scope="site"), "scope must be"),
    (Route("10.0.0.0/24", gateway="2001:db8::1"), "not IPv4"),
    (Route("10.0.0.0/24", gateway="10.1.1.1", onlink=True), "onlink needs"),
    (Route("10.0.0.0/24", gateway="10.1.1.1", scope="link"), "scope universe"),
    (Route("10.0.0.0/24", dev="a" * 16), "device name"),
    (Route("10.0.0.0/24", dev="eth0", src="::1"), "src"),
])
def test_normalize_rejects(route, msg):
    with pytest.raises(ValueError, match=msg):
        normalize(route)


def test_set_desired_rejects_two_routes_for_one_destination_and_keeps_state():
    d = RouteDriver(netns="unused")
    ok = frozenset({Route("10.9.0.0/24", type="blackhole")})
    d.set_desired(ok)
    with pytest.raises(ValueError, match="two different routes"):
        d.set_desired(frozenset({Route("10.0.0.0/24", dev="eth0"), Route("10.0.0.0/24", type="blackhole")}))
    assert d._desired == ok
    with pytest.raises(ValueError, match="protocol"):
        RouteDriver(proto=4)


def test_matches_ignores_dev_the_kernel_chose():
    want = Route("10.1.0.0/26", gateway="192.168.100.12")
    assert matches(want, Route("10.1.0.0/26", dev="eth0", gateway="192.168.100.12"))
    assert not matches(want, Route("10.1.0.0/26", dev="eth0", gateway="192.168.100.13"))
    assert not matches(Route("10.1.0.0/26", dev="eth1", gateway="192.168.100.12"),
                       Route("10.1.0.0/26", dev="eth0", gateway="192.168.100.12"))


def test_plan_add_replace_delete_keep():
    keep = Route("10.1.0.0/26", dev="eth0", gateway="192.168.100.12", onlink=True)
    change = Route("10.2.0.0/26", dev="eth0", gateway="192.168.100.13", onlink=True)
    new = Route("10.3.0.0/26", type="blackhole")
    actual = [
        kr(keep),
        kr(Route("10.2.0.0/26", dev="eth0", gateway="192.168.100.99", onlink=True)),
        kr(Route("10.4.0.0/26", type="blackhole")),  # ours, no longer wanted
        kr(Route("10.5.0.0/26", dev="eth0", gateway="192.168.100.1"), proto=4),  # foreign (static)
    ]
    p = plan(frozenset({keep, change, new}), actual, PROTO)
    assert p.put == [(change, "replace"), (new, "add")]
    assert [k.route.dst for k in p.delete] == ["10.4.0.0/26"]
    assert p.conflicts == {}


def test_plan_never_overwrites_a_foreign_route():
    foreign = kr(Route("10.1.0.0/26", dev="eth0", scope="link"), proto=12)  # bird
    p = plan(frozenset({Route("10.1.0.0/26", type="blackhole")}), [foreign], PROTO)
    assert p.put == [] and p.delete == [] and "10.1.0.0/26" in p.conflicts


def test_plan_removes_our_duplicates_at_other_metrics():
    r = Route("10.1.0.0/26", type="blackhole")
    p = plan(frozenset({r}), [kr(r), kr(r, priority=7)], PROTO)
    assert p.put == [] and [k.priority for k in p.delete] == [7]
    # IPv6: the kernel's default metric is 1024, not 0.
    r6 = Route("2001:db8::/64", type="unreachable")
    assert plan(frozenset({r6}), [kr(r6, priority=1024, version=6)], PROTO).put == []
