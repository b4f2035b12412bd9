"""IpsetDriver against the real ipset tool inside a lab node namespace."""
import pytest

from felix_agent.calc.desired import IpSet
from felix_agent.dataplane import cmd as cmd_mod
from felix_agent.dataplane import ipsets as ipsets_mod
from felix_agent.dataplane.ipsets import IpsetDriver
from felix_agent.dataplane.ipsets_diff import parse_save

pytestmark = pytest.mark.root

A = IpSet("cali40s:a", frozenset({"10.65.0.1", "10.65.0.2", "10.65.1.0/26"}))
B = IpSet("cali60s:b", frozenset({"2001:db8::1", "2001:db8:1::/64"}), family="inet6")
P = IpSet("cali40n:p", frozenset({"10.65.0.1,tcp:8080", "10.65.0.2,udp:53"}), type="hash:ip,port")


@pytest.fixture
def node(make_lab):
    lab = make_lab(1)
    return lab, lab.nodes[0].ns


def sets(lab, ns):
    return parse_save(lab.exec(ns, "ipset", "save").stdout)


def references(lab, ns, name):
    out = lab.exec(ns, "ipset", "list", "-t", name).stdout
    return int(next(ln for ln in out.splitlines() if ln.startswith("References:")).split()[1])


def test_create_update_delete_and_noop(node, monkeypatch):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({s.name: s for s in (A, B, P)})
    ch = d.apply()
    assert sorted(ch.created) == sorted([A.name, B.name, P.name]) and ch.members_added == 7
    got = sets(lab, ns)
    assert got[A.name].members == {"10.65.0.1", "10.65.0.2", "10.65.1.0/26"}
    assert got[B.name].family == "inet6" and got[B.name].members == {"2001:db8::1", "2001:db8:1::/64"}
    assert got[P.name].type == "hash:ip,port" and got[P.name].members == {"10.65.0.1,tcp:8080", "10.65.0.2,udp:53"}

    calls = []
    real = cmd_mod.run
    monkeypatch.setattr(ipsets_mod, "run", lambda argv, *a, **kw: calls.append(argv[:2]) or real(argv, *a, **kw))
    assert not d.apply()
    assert ["ipset", "restore"] not in calls
    monkeypatch.undo()

    a2 = IpSet(A.name, frozenset({"10.65.0.1", "10.65.0.3", "10.65.1.0/26"}))
    d.set_desired({A.name: a2, P.name: P})
    ch = d.apply()
    assert ch.updated == [A.name] and (ch.members_added, ch.members_removed) == (1, 1)
    assert ch.destroyed == [B.name]
    got = sets(lab, ns)
    assert B.name not in got and got[A.name].members == {"10.65.0.1", "10.65.0.3", "10.65.1.0/26"}


def test_drift_repair(node):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A, P.name: P})
    d.apply()
    lab.exec(ns, "ipset", "add", A.name, "192.0.2.99")
    lab.exec(ns, "ipset", "del", A.name, "10.65.0.2")
    lab.exec(ns, "ipset", "destroy", P.name)
    lab.exec(ns, "ipset", "create", "cali40s:stray", "hash:ip")  # ours by name, not desired
    ch = d.apply()
    assert ch.updated == [A.name] and ch.created == [P.name] and ch.destroyed == ["cali40s:stray"]
    got = sets(lab, ns)
    assert got[A.name].members == {"10.65.0.1", "10.65.0.2", "10.65.1.0/26"}
    assert got[P.name].members == {"10.65.0.1,tcp:8080", "10.65.0.2,udp:53"}
    assert "cali40s:stray" not in got
    assert not d.apply()


def test_foreign_sets_untouched(node):
    lab, ns = node
    lab.exec(ns, "ipset", "create", "kube-x", "hash:ip")
    lab.exec(ns, "ipset", "add", "kube-x", "10.96.0.1")
    lab.exec(ns, "ipset", "create", "KUBE-cali", "hash:net")
    before = lab.exec(ns, "ipset", "save").stdout
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A})
    d.apply()
    d.set_desired({})
    assert d.apply().destroyed == [A.name]
    assert lab.exec(ns, "ipset", "save").stdout == before


def test_type_change_swap_and_recreate(node):
    lab, ns = node
    # A set of ours made too small by someone (maxelem 2) and used by an iptables rule:
    # the driver builds a bigger one aside and swaps it in; the rule keeps its reference.
    lab.exec(ns, "ipset", "create", A.name, "hash:net", "maxelem", "2")
    lab.exec(ns, "iptables-nft", "-A", "INPUT", "-m", "set", "--match-set", A.name, "src", "-j", "ACCEPT")
    # And an unreferenced set whose type changes in a way swap cannot do.
    lab.exec(ns, "ipset", "create", "cali40s:t", "hash:net")
    lab.exec(ns, "ipset", "add", "cali40s:t", "10.0.0.0/8")
    t = IpSet("cali40s:t", frozenset({"10.1.1.1"}), type="hash:ip")
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A, t.name: t})
    ch = d.apply()
    assert sorted(ch.recreated) == sorted([A.name, t.name]) and not ch.failed
    got = sets(lab, ns)
    assert got[A.name].maxelem >= 3 and got[A.name].members == {"10.65.0.1", "10.65.0.2", "10.65.1.0/26"}
    assert got[t.name].type == "hash:ip" and got[t.name].members == {"10.1.1.1"}
    assert references(lab, ns, A.name) == 1
    assert not [n for n in got if "tmp" in n]
    assert not d.apply()


def test_referenced_type_change_is_reported_not_forced(node):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A})
    d.apply()
    lab.exec(ns, "iptables-nft", "-A", "INPUT", "-m", "set", "--match-set", A.name, "src", "-j", "ACCEPT")
    as_ip = IpSet(A.name, frozenset({"10.65.0.1"}), type="hash:ip")
    other = IpSet("cali40s:o", frozenset({"10.0.0.1"}))
    d.set_desired({A.name: as_ip, other.name: other})
    ch = d.apply()
    assert A.name in ch.failed and "iptables" in ch.failed[A.name]
    assert ch.created == [other.name]  # the rest of the batch still went in
    assert sets(lab, ns)[A.name].type == "hash:net"


def test_deletion_waits_for_iptables(node):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A})
    d.apply_updates()
    lab.exec(ns, "iptables-nft", "-A", "INPUT", "-m", "set", "--match-set", A.name, "src", "-j", "ACCEPT")
    d.set_desired({})
    assert not d.apply_updates()  # phase 1 never destroys
    ch = d.apply_deletions()
    assert ch.failed == {A.name: "still referenced by iptables rules"} and not ch.destroyed
    assert A.name in sets(lab, ns)
    lab.exec(ns, "iptables-nft", "-D", "INPUT", "1")
    assert d.apply_deletions().destroyed == [A.name]
    assert A.name not in sets(lab, ns)


def test_bad_input_changes_nothing(node):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A})
    d.apply()
    before = lab.exec(ns, "ipset", "save").stdout
    with pytest.raises(ValueError, match="IPv6"):
        d.set_desired({A.name: IpSet(A.name, frozenset({"2001:db8::1"}))})
    assert not d.apply()
    assert lab.exec(ns, "ipset", "save").stdout == before


class Calls:
    """Records the ipset subcommands the driver runs (they still run for real)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = cmd_mod.run
        monkeypatch.setattr(ipsets_mod, "run", lambda argv, *a, **kw: self.calls.append(" ".join(argv[1:])) or real(argv, *a, **kw))


def test_incremental_phases_use_the_view_and_match_the_kernel(node, monkeypatch):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({s.name: s for s in (A, B, P)})
    d.apply(full=True)
    spy = Calls(monkeypatch)
    a2 = IpSet(A.name, frozenset({"10.65.0.1", "10.65.0.3", "10.65.1.0/26"}))
    wider = IpSet(P.name, P.members, type="hash:net,port")  # a kind change: destroyed, re-created
    for want in ({A.name: a2, B.name: B, P.name: P}, {A.name: a2, P.name: wider}):
        d.set_desired(want)
        d.apply_updates(full=False)
        d.apply_deletions(full=False)
    # Two updates and one destroy; the reference checks (`list -t`: may P be re-created, may B
    # be destroyed?) stay, but no `save` and no `list -n`.  A's change (one member out, one
    # in) went over netlink, not through a restore.
    assert spy.calls == ["list -t", "restore -exist", "list -t", "restore -exist"]
    assert d.netlink.ops == 2
    got = sets(lab, ns)
    assert set(k for k in got if k.startswith("cali")) == {A.name, P.name}
    assert got[A.name].members == {"10.65.0.1", "10.65.0.3", "10.65.1.0/26"} and got[P.name].type == "hash:net,port"
    # The view equals what the kernel now holds: a full pass finds nothing to do.
    assert d._view == parse_save(lab.exec(ns, "ipset", "save").stdout, "cali")
    assert not d.apply(full=True)


def test_set_destroyed_between_resyncs_is_recreated_in_the_same_call(node, monkeypatch):
    lab, ns = node
    d = IpsetDriver(netns=ns)
    d.set_desired({A.name: A})
    d.apply(full=True)
    lab.exec(ns, "ipset", "destroy", A.name)  # behind our back
    spy = Calls(monkeypatch)
    d.set_desired({A.name: IpSet(A.name, A.members | {"10.65.0.9"})})  # "add" to a set that is gone
    ch = d.apply_updates(full=False)
    assert spy.calls == ["restore -exist", "save", "restore -exist"] and ch.created == [A.name]
    assert sets(lab, ns)[A.name].members == {"10.65.0.1", "10.65.0.2", "10.65.0.9", "10.65.1.0/26"}


def test_small_member_batches_go_over_netlink_large_ones_through_restore(node, monkeypatch):
    """A pod's ADD/DEL changes a few members: those are sent over netlink (no `ipset`
    run), for every kind netlink takes here (hash:net,iface as cali40wl-src, IPv6); the
    kernel then holds exactly the desired members.  A batch above NETLINK_MAX_OPS, or one
    touching a port set, is one restore."""
    lab, ns = node
    wl = IpSet("cali40wl-src", frozenset({"10.65.0.1,cali1111111111a"}), type="hash:net,iface")
    d = IpsetDriver(netns=ns)
    d.set_desired({s.name: s for s in (A, B, P, wl)})
    d.apply()
    spy = Calls(monkeypatch)
    wl2 = IpSet(wl.name, frozenset({"10.65.0.2,cali2222222222b", "10.65.0.3/32,cali3333333333c"}), type=wl.type)
    b2 = IpSet(B.name, frozenset({"2001:db8::2", "2001:db8:1::/64"}), family="inet6")
    d.set_desired({A.name: A, B.name: b2, P.name: P, wl.name: wl2})
    ch = d.apply_updates(full=False)
    assert spy.calls == [] and ch.netlink_ops == 5 and ch.restore_calls == 0 and ch
    got = sets(lab, ns)
    assert got[wl.name].members == {"10.65.0.2,cali2222222222b", "10.65.0.3,cali3333333333c"}
    assert got[B.name].members == {"2001:db8::2", "2001:db8:1::/64"}
    assert d._view == parse_save(lab.exec(ns, "ipset", "save").stdout, "cali")

    many = IpSet(A.name, frozenset(f"10.66.0.{i}" for i in range(ipsets_mod.NETLINK_MAX_OPS + 1)))
    d.set_desired({A.name: many, B.name: b2, P.name: P, wl.name: wl2})
    ch = d.apply_updates(full=False)
    assert spy.calls == ["restore -exist"] and ch.restore_calls == 1 and ch.netlink_ops == 0
    p2 = IpSet(P.name, frozenset({"10.65.0.1,tcp:8081"}), type=P.type)
    d.set_desired({A.name: many, B.name: b2, P.name: p2, wl.name: wl2})
    d.apply_updates(full=False)
    assert spy.calls == ["restore -exist", "restore -exist"]  # ports: not spoken over netlink here
    assert sets(lab, ns)[P.name].members == {"10.65.0.1,tcp:8081"}
    assert not d.apply(full=True)  # the kernel agrees with everything the view says
