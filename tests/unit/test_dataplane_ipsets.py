"""The ipset driver's pure parts: member canonical form, save parser, update plan."""
import pytest

from felix_agent.calc.desired import IpSet
from felix_agent.dataplane.ipsets import IpsetDriver
from felix_agent.dataplane.ipsets_diff import (
    SavedSet, advance_updates, canonical_member, parse_save, plan_updates, swap_compatible, temp_name,
)

SAVE = """create cali40s:a hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1
add cali40s:a 10.0.0.0/24
add cali40s:a 10.0.1.1
create kube-x hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x2
add kube-x 1.1.1.1
create cali60s:b hash:ip,port family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0x3
add cali60s:b 2001:db8::1,tcp:80
create calibm bitmap:port range 0-65535
add calibm 80
"""


@pytest.mark.parametrize("member,type_,family,want", [
    ("10.0.1.1/32", "hash:net", "inet", "10.0.1.1"),
    ("10.0.1.7/24", "hash:net", "inet", "10.0.1.0/24"),
    ("10.0.1.7", "hash:ip", "inet", "10.0.1.7"),
    ("10.0.1.7/32", "hash:ip", "inet", "10.0.1.7"),
    ("2001:0db8:0::1/128", "hash:net", "inet6", "2001:db8::1"),
    ("10.0.0.1,80", "hash:ip,port", "inet", "10.0.0.1,tcp:80"),
    ("10.0.0.1,UDP:53", "hash:ip,port", "inet", "10.0.0.1,udp:53"),
    ("10.0.0.0/8,eth0", "hash:net,iface", "inet", "10.0.0.0/8,eth0"),
    ("8080", "bitmap:port", "inet", "8080"),
])
def test_canonical_member(member, type_, family, want):
    assert canonical_member(member, type_, family) == want


@pytest.mark.parametrize("member,type_,family,msg", [
    ("10.0.0.0/24", "hash:ip", "inet", "addresses"),
    ("2001:db8::1", "hash:net", "inet", "IPv6"),
    ("10.0.0.1", "hash:ip,port", "inet", "parts"),
    ("10.0.0.1,tcp:99999", "hash:ip,port", "inet", "port"),
    ("10.0.0.1,gre:1", "hash:ip,port", "inet", "protocol"),
    ("tcp:80", "bitmap:port", "inet", "bare port"),
    ("nonsense", "hash:net", "inet", "does not appear"),
])
def test_canonical_member_rejects(member, type_, family, msg):
    with pytest.raises(ValueError, match=msg):
        canonical_member(member, type_, family)


def test_parse_save_filters_by_prefix():
    sets = parse_save(SAVE, "cali")
    assert sorted(sets) == ["cali40s:a", "cali60s:b", "calibm"]
    a = sets["cali40s:a"]
    assert (a.type, a.family, a.maxelem, a.members) == ("hash:net", "inet", 1048576, {"10.0.0.0/24", "10.0.1.1"})
    assert sets["cali60s:b"].family == "inet6"
    assert sets["calibm"].members == {"80"}
    assert "kube-x" in parse_save(SAVE)


def test_swap_compatibility_follows_kernel_features():
    assert swap_compatible("hash:net", "inet", "hash:net", "inet")
    assert not swap_compatible("hash:net", "inet", "hash:net", "inet6")
    assert not swap_compatible("hash:ip", "inet", "hash:net", "inet")  # net has 'nomatch'
    assert not swap_compatible("hash:ip", "inet", "hash:ip,port", "inet")


def _plan(actual_text, desired, referenced=None):
    d = IpsetDriver(netns="unused")
    d.set_desired(desired)
    return plan_updates("cali", parse_save(actual_text, "cali"), d._desired, d._members, referenced)


def test_plan_creates_updates_and_leaves_equal_sets():
    desired = {
        "cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.9/24", "10.0.2.2"})),  # same net, new host
        "cali60s:b": IpSet("cali60s:b", frozenset({"2001:db8::1,80"}), "hash:ip,port", "inet6"),  # equal
        "cali40s:new": IpSet("cali40s:new", frozenset({"192.168.0.0/16"})),
    }
    lines, ch = _plan(SAVE, desired)
    assert lines == [
        "del cali40s:a 10.0.1.1", "add cali40s:a 10.0.2.2",
        "create cali40s:new hash:net family inet maxelem 1048576", "add cali40s:new 192.168.0.0/16",
    ]
    assert ch.created == ["cali40s:new"] and ch.updated == ["cali40s:a"]
    assert (ch.members_added, ch.members_removed) == (2, 1)


def test_plan_swaps_when_kernel_can_and_recreates_unreferenced_otherwise():
    small = "create cali40s:a hash:net family inet hashsize 1024 maxelem 2 initval 0x1\nadd cali40s:a 10.0.0.1\n"
    desired = {"cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.1", "10.0.0.2", "10.0.0.3"}))}
    lines, ch = _plan(small, desired)
    tmp = temp_name("cali", "cali40s:a")
    assert lines[0] == f"create {tmp} hash:net family inet maxelem 1048576"
    assert lines[-2:] == [f"swap {tmp} cali40s:a", f"destroy {tmp}"]
    assert ch.recreated == ["cali40s:a"]
    # hash:net -> hash:ip cannot be swapped: re-created when nothing uses it ...
    desired = {"cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.1"}), "hash:ip")}
    lines, ch = _plan(small, desired, referenced=set())
    assert lines[:2] == ["destroy cali40s:a", "create cali40s:a hash:ip family inet maxelem 1048576"]
    # ... and refused (reported, nothing written) when a rule uses it.
    lines, ch = _plan(small, desired, referenced={"cali40s:a"})
    assert lines == [] and "cali40s:a" in ch.failed


@pytest.mark.parametrize("sets,msg", [
    ({"kube-a": IpSet("kube-a", frozenset())}, "must start with"),
    ({"cali-a": IpSet("cali-b", frozenset())}, "named"),
    ({"cali" + "x" * 30: IpSet("cali" + "x" * 30, frozenset())}, "characters"),
    ({"cali-a": IpSet("cali-a", frozenset(), "hash:mac")}, "unsupported type"),
    ({"cali-a": IpSet("cali-a", frozenset(), family="ipv4")}, "family"),
    ({"cali-a": IpSet("cali-a", frozenset({"300.1.1.1"}))}, "cali-a"),
    ({"cali-a bad": IpSet("cali-a bad", frozenset())}, "must start with"),
    ({"calitmp:x": IpSet("calitmp:x", frozenset())}, "temporary"),
])
def test_set_desired_rejects_bad_input_and_keeps_state(sets, msg):
    d = IpsetDriver(netns="unused")
    ok = {"cali-ok": IpSet("cali-ok", frozenset({"10.0.0.1"}))}
    d.set_desired(ok)
    with pytest.raises(ValueError, match=msg):
        d.set_desired(sets)
    assert d._desired == ok


def test_temp_name_is_ours_and_short():
    t = temp_name("cali", "cali40s:" + "x" * 23)
    assert t.startswith("cali") and len(t) <= 31
    assert SavedSet("x", "hash:ip", "inet", 1).members == set()


@pytest.mark.parametrize("actual_text,desired,referenced", [
    (SAVE, {"cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.9/24", "10.0.2.2"})),
            "cali40s:new": IpSet("cali40s:new", frozenset({"192.168.0.0/16"})),
            "calibm": IpSet("calibm", frozenset({"443"}), "bitmap:port")}, None),
    # swapped in through a temporary set (a leftover temporary set from a crash included)
    ("create cali40s:a hash:net family inet maxelem 2\nadd cali40s:a 10.0.0.1\n"
     f"create {temp_name('cali', 'cali40s:a')} hash:net family inet maxelem 2\n",
     {"cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.1", "10.0.0.2", "10.0.0.3"}))}, None),
    # destroyed and re-created, and one left alone (reported)
    ("create cali40s:a hash:net family inet maxelem 9\ncreate cali40s:b hash:net family inet maxelem 9\n",
     {"cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.1"}), "hash:ip"),
      "cali40s:b": IpSet("cali40s:b", frozenset({"10.0.0.1"}), "hash:ip")}, {"cali40s:b"}),
])
def test_view_after_updates_needs_no_more_work(actual_text, desired, referenced):
    """The view advance_updates() builds is what `ipset save` would show after the batch
    (checked against the kernel in tests/integration): planning on it finds nothing to do."""
    d = IpsetDriver(netns="unused")
    d.set_desired(desired)
    actual = parse_save(actual_text, "cali")
    lines, ch = plan_updates("cali", actual, d._desired, d._members, referenced)
    assert lines
    view = advance_updates("cali", actual, d._desired, d._members, ch)
    again, ch2 = plan_updates("cali", view, d._desired, d._members, referenced)
    assert again == [] and ch2.failed == ch.failed
    assert temp_name("cali", "cali40s:a") not in view or "swap" not in " ".join(lines)
    for name in set(desired) - set(ch.failed):
        assert (view[name].type, view[name].members) == (desired[name].type, d._members[name])
    for name in ch.failed:
        assert view[name] is actual[name]
    assert "kube-x" not in view and (actual_text != SAVE or view["cali60s:b"] is actual["cali60s:b"])


def test_unchanged_sets_keep_their_canonical_members():
    d = IpsetDriver(netns="unused")
    a = IpSet("cali40s:a", frozenset({"10.0.0.1/32"}))
    d.set_desired({"cali40s:a": a, "cali40s:b": IpSet("cali40s:b", frozenset())})
    members = d._members["cali40s:a"]
    d.set_desired({"cali40s:a": IpSet("cali40s:a", frozenset({"10.0.0.1/32"})),
                   "cali40s:b": IpSet("cali40s:b", frozenset({"10.0.0.2"}))})
    assert d._members["cali40s:a"] is members and d._members["cali40s:b"] == {"10.0.0.2"}
    # Still as strict: a set whose members change is canonicalised (and checked) again.
    with pytest.raises(ValueError, match="IPv6"):
        d.set_desired({"cali40s:a": IpSet("cali40s:a", frozenset({"2001:db8::1"}))})


def test_member_ops_takes_only_small_member_batches_of_netlink_kinds():
    from felix_agent.dataplane.ipset_netlink import member_ops
    kinds = {"cali40wl-src": ("net,iface", "inet"), "cali60s:b": ("ip", "inet6"),
             "cali40n:p": ("ip,port", "inet")}
    lines = ["del cali40wl-src 10.0.0.1,cali1", "add cali60s:b 2001:db8::1"]
    assert member_ops(lines, kinds, 16) == [("del", "cali40wl-src", "10.0.0.1,cali1"),
                                            ("add", "cali60s:b", "2001:db8::1")]
    assert member_ops(lines, kinds, 1) is None  # too many for netlink: one restore
    assert member_ops([], kinds, 16) is None
    assert member_ops(["add cali40n:p 10.0.0.1,tcp:80"], kinds, 16) is None  # a port dimension
    assert member_ops(["create cali40x hash:net family inet maxelem 1048576",
                       "add cali40x 10.0.0.0/24"], {**kinds, "cali40x": ("net", "inet")}, 16) is None
    assert member_ops(["destroy cali40wl-src"], kinds, 16) is None
    assert member_ops(["add cali40unknown 10.0.0.1"], kinds, 16) is None
