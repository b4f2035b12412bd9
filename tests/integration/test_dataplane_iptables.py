"""IptablesTable against real iptables (both backends) inside a lab node namespace."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felix_agent.calc.desired import Hook
from felix_agent.dataplane import cmd as cmd_mod
from felix_agent.dataplane import iptables as ipt_mod
from felix_agent.dataplane.cmd import CommandError
from felix_agent.dataplane.iptables import IptablesTable
from felix_agent.dataplane.iptables_rules import chain_rule_ids, hook_id, parse_save

pytestmark = pytest.mark.root

BACKENDS = ["nft", "legacy"]

CHAINS = {
    "cali-INPUT": ("-p icmp", "-p icmp --icmp-type echo-request", "-j cali-wl-to-host"),
    "cali-wl-to-host": ("-s 10.65.0.0/16 -j RETURN", "-p tcp --dport 22 -j ACCEPT"),
    "cali-OUTPUT": ("-p icmp",),
}
HOOKS = [Hook("filter", "INPUT", "cali-INPUT"), Hook("filter", "OUTPUT", "cali-OUTPUT")]


@pytest.fixture
def node(make_lab):
    lab = make_lab(1)
    return lab, lab.nodes[0].ns


def save(lab, ns, backend, table="filter", v=4):
    tool = f"{'iptables' if v == 4 else 'ip6tables'}-{backend}-save"
    return lab.exec(ns, tool, "-c", "-t", table).stdout


def ids(lab, ns, backend, chain, table="filter", v=4):
    return [r.rule_id for r in parse_save(save(lab, ns, backend, table, v), table).rules.get(chain, [])]


def ipt(lab, ns, backend, *args, v=4):
    return lab.exec(ns, f"{'iptables' if v == 4 else 'ip6tables'}-{backend}", "-w", *args)


class RunSpy:
    """Records the commands the driver runs (they still run for real)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = cmd_mod.run

        def spy(argv, *a, **kw):
            self.calls.append(argv[0])
            return real(argv, *a, **kw)
        monkeypatch.setattr(ipt_mod, "run", spy)

    def restores(self):
        return [c for c in self.calls if c.endswith("-restore")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_apply_and_second_apply_is_a_noop(node, backend, monkeypatch):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    ch = t.apply()
    assert ch.changed and sorted(ch.chains_created) == sorted(CHAINS)
    assert ch.rules_inserted == 6 + 2
    for chain, bodies in CHAINS.items():
        assert ids(lab, ns, backend, chain) == chain_rule_ids(chain, bodies)
    text = save(lab, ns, backend)
    assert f'-A INPUT -m comment --comment "cali:{hook_id(HOOKS[0])}" -j cali-INPUT' in text
    assert "-A cali-wl-to-host -s 10.65.0.0/16" in text
    spy = RunSpy(monkeypatch)
    again = t.apply()
    assert not again and again.restore_calls == 0
    assert spy.calls and spy.restores() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_rule_change_keeps_other_rules_counters(node, backend):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    t.apply()
    assert lab.ping(ns, "127.0.0.1", count=3)
    before = {r.rule_id: r.packets for r in parse_save(save(lab, ns, backend), "filter").rules["cali-INPUT"]}
    assert all(p > 0 for p in list(before.values())[:2]), before
    changed = dict(CHAINS)
    changed["cali-INPUT"] = ("-p icmp", "-p icmp --icmp-type echo-reply", "-j cali-wl-to-host")
    t.set_desired(changed, HOOKS)
    ch = t.apply()
    assert (ch.rules_replaced, ch.rules_inserted, ch.rules_deleted) == (1, 0, 0)
    assert ch.chains_updated == ["cali-INPUT"]
    after = parse_save(save(lab, ns, backend), "filter")
    rules = after.rules["cali-INPUT"]
    assert [r.rule_id for r in rules] == chain_rule_ids("cali-INPUT", changed["cali-INPUT"])
    # The untouched rules kept their packet counts: they were not rewritten.
    assert rules[0].packets >= before[rules[0].rule_id] > 0
    assert rules[2].packets == before[rules[2].rule_id]
    assert rules[1].packets == 0
    # The hook rule kept its counter too.
    assert after.rules["INPUT"][0].packets > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_a_chain_and_its_references(node, backend):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    t.apply()
    smaller = {"cali-INPUT": ("-p icmp",), "cali-OUTPUT": CHAINS["cali-OUTPUT"]}
    t.set_desired(smaller, HOOKS)
    ch = t.apply()
    assert ch.chains_deleted == ["cali-wl-to-host"]
    table = parse_save(save(lab, ns, backend), "filter")
    assert "cali-wl-to-host" not in table.chains
    assert len(table.rules["cali-INPUT"]) == 1
    # Drop everything: chains and hooks go, built-in chains are left as they were.
    t.set_desired({}, [])
    ch = t.apply()
    assert sorted(ch.chains_deleted) == ["cali-INPUT", "cali-OUTPUT"]
    table = parse_save(save(lab, ns, backend), "filter")
    assert not [c for c in table.chains if c.startswith("cali-")]
    assert table.rules["INPUT"] == [] and table.rules["OUTPUT"] == []
    assert not t.apply()


@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_repair_hook_moved_back_on_top_and_rules_restored(node, backend):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    t.apply()
    # Someone inserts a rule above our hook, deletes one of our rules, adds one to our
    # chain, and flushes another of our chains.
    ipt(lab, ns, backend, "-I", "INPUT", "1", "-s", "192.0.2.1", "-j", "ACCEPT")
    ipt(lab, ns, backend, "-D", "cali-INPUT", "2")
    ipt(lab, ns, backend, "-A", "cali-wl-to-host", "-s", "192.0.2.2", "-j", "ACCEPT")
    ipt(lab, ns, backend, "-F", "cali-OUTPUT")
    ch = t.apply()
    assert ch.hooks_rewritten == ["INPUT"]
    table = parse_save(save(lab, ns, backend), "filter")
    assert table.rules["INPUT"][0].rule_id == hook_id(HOOKS[0])
    assert table.rules["INPUT"][1].body == "-s 192.0.2.1/32 -j ACCEPT"  # kept, just below
    for chain, bodies in CHAINS.items():
        assert [r.rule_id for r in table.rules[chain]] == chain_rule_ids(chain, bodies)
    assert not t.apply()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_deleted_by_hand_comes_back(node, backend):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    t.apply()
    ipt(lab, ns, backend, "-D", "OUTPUT", "1")
    ipt(lab, ns, backend, "-F", "cali-OUTPUT")
    ipt(lab, ns, backend, "-X", "cali-OUTPUT")
    ch = t.apply()
    assert ch.chains_created == ["cali-OUTPUT"] and ch.hooks_rewritten == ["OUTPUT"]
    assert ids(lab, ns, backend, "OUTPUT") == [hook_id(HOOKS[1])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreign_chains_and_rules_untouched(node, backend):
    lab, ns = node
    ipt(lab, ns, backend, "-N", "KUBE-SERVICES")
    ipt(lab, ns, backend, "-A", "KUBE-SERVICES", "-d", "10.96.0.1", "-p", "tcp", "--dport", "443", "-j", "ACCEPT")
    ipt(lab, ns, backend, "-A", "INPUT", "-j", "KUBE-SERVICES")
    ipt(lab, ns, backend, "-A", "FORWARD", "-s", "203.0.113.0/24", "-j", "DROP")
    ipt(lab, ns, backend, "-t", "nat", "-A", "POSTROUTING", "-s", "203.0.113.0/24", "-j", "MASQUERADE")

    def foreign():
        out = []
        for table in ("filter", "nat"):
            for line in save(lab, ns, backend, table).splitlines():
                if line.startswith("[") and "cali" not in line:
                    out.append((table, line.split("] ", 1)[1]))
        return out

    before = foreign()
    assert len(before) == 4
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    t.apply()
    t.set_desired({"cali-INPUT": ("-j RETURN",)}, [HOOKS[0]])
    t.apply()
    t.set_desired({}, [])
    t.apply()
    assert foreign() == before
    assert ids(lab, ns, backend, "INPUT") == [None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_chain_a_foreign_rule_uses_is_flushed_not_deleted(node, backend):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired({"cali-a": ("-j RETURN",)}, [])
    t.apply()
    ipt(lab, ns, backend, "-N", "OTHER")
    ipt(lab, ns, backend, "-A", "OTHER", "-j", "cali-a")
    t.set_desired({}, [])
    ch = t.apply()
    assert ch.chains_flushed_kept == ["cali-a"] and ch.chains_deleted == []
    table = parse_save(save(lab, ns, backend), "filter")
    assert table.rules["cali-a"] == [] and len(table.rules["OTHER"]) == 1
    assert not t.apply()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rule_is_refused_and_changes_nothing(node, backend):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(CHAINS, HOOKS)
    t.apply()
    before = save(lab, ns, backend).splitlines()[1:-1]
    bad = dict(CHAINS)
    bad["cali-OUTPUT"] = ("-p icmp", "-m nosuchmatch --frob 1 -j ACCEPT")
    bad["cali-new"] = ("-j RETURN",)
    t.set_desired(bad, HOOKS)
    with pytest.raises(CommandError, match="restore"):
        t.apply()
    assert save(lab, ns, backend).splitlines()[1:-1] == before
    # Invalid names never get that far.
    with pytest.raises(ValueError):
        t.set_desired({"INPUT": ()}, [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nat_table_and_ipv6(node, backend):
    lab, ns = node
    nat = IptablesTable("nat", backend, netns=ns)
    nat.set_desired({"cali-POSTROUTING": ("-j cali-nat-outgoing",),
                     "cali-nat-outgoing": ("-s 10.65.0.0/16 ! -d 10.65.0.0/16 -j MASQUERADE",)},
                    [Hook("nat", "POSTROUTING", "cali-POSTROUTING")])
    assert nat.apply().chains_created == ["cali-POSTROUTING", "cali-nat-outgoing"]
    assert "-j MASQUERADE" in save(lab, ns, backend, "nat")
    assert not nat.apply()
    v6 = IptablesTable("filter", backend, netns=ns, ip_version=6)
    v6.set_desired({"cali-INPUT": ("-p ipv6-icmp", "-s 2001:db8::/64 -j RETURN")},
                   [Hook("filter", "INPUT", "cali-INPUT")])
    assert v6.apply().rules_inserted == 3
    assert ids(lab, ns, backend, "cali-INPUT", v=6) == chain_rule_ids(
        "cali-INPUT", ("-p ipv6-icmp", "-s 2001:db8::/64 -j RETURN"))
    assert "2001:db8::/64" in save(lab, ns, backend, v=6)
    assert not v6.apply()
    # The IPv4 filter table was never touched by either.
    assert "cali" not in save(lab, ns, backend, "filter")


def test_both_backends_in_one_namespace_stay_separate(node):
    lab, ns = node
    legacy = IptablesTable("filter", "legacy", netns=ns)
    nft = IptablesTable("filter", "nft", netns=ns)
    legacy.set_desired({"cali-L": ("-j RETURN",)}, [Hook("filter", "INPUT", "cali-L")])
    nft.set_desired({"cali-N": ("-j RETURN",)}, [Hook("filter", "INPUT", "cali-N")])
    assert legacy.apply() and nft.apply()
    assert "cali-L" in save(lab, ns, "legacy") and "cali-N" not in save(lab, ns, "legacy")
    assert "cali-N" in save(lab, ns, "nft") and "cali-L" not in save(lab, ns, "nft")
    assert not legacy.apply() and not nft.apply()
    legacy.set_desired({}, [])
    assert legacy.apply().chains_deleted == ["cali-L"]
    assert "cali-N" in save(lab, ns, "nft")


# --- between resyncs: planning against the table's own view --------------------------------

def our_ids(lab, ns, backend):
    """chain -> ids for our chains and the built-in chains (what the driver manages)."""
    t = parse_save(save(lab, ns, backend), "filter")
    return {c: [r.rule_id for r in rules] for c, rules in t.rules.items() if c.startswith("cali-") or rules}


def with_pods(n: int) -> dict:
    """CHAINS plus a dispatch chain with one rule per pod, as ADDs grow it."""
    chains = dict(CHAINS)
    chains["cali-INPUT"] = CHAINS["cali-INPUT"] + ("-j cali-disp",)
    chains["cali-disp"] = tuple(f"-i cali{i:011x} -j ACCEPT" for i in range(n))
    return chains


def test_incremental_applies_do_not_read_the_table(node, monkeypatch):
    lab, ns = node
    t = IptablesTable("filter", "nft", netns=ns)
    t.set_desired(with_pods(0), HOOKS)
    t.apply(full=True)
    spy = RunSpy(monkeypatch)
    for n in (1, 2, 3, 1):  # pods come and go
        t.set_desired(with_pods(n), HOOKS)
        assert t.apply(full=False).changed
    assert [c for c in spy.calls if c.endswith("-save")] == [] and len(spy.restores()) == 4
    assert ids(lab, ns, "nft", "cali-disp") == chain_rule_ids("cali-disp", with_pods(1)["cali-disp"])
    # A full pass reads, finds the table as the view said, and writes nothing.
    assert not t.apply(full=True) and spy.calls[4:] == ["iptables-nft-save"]


def test_foreign_edit_between_resyncs_is_repaired_at_the_next_full_pass(node):
    lab, ns = node
    t = IptablesTable("filter", "nft", netns=ns)
    t.set_desired(with_pods(2), HOOKS)
    t.apply(full=True)
    ipt(lab, ns, "nft", "-F", "cali-OUTPUT")  # someone flushes one of our chains ...
    ipt(lab, ns, "nft", "-D", "INPUT", "1")  # ... and removes a hook
    t.set_desired(with_pods(3), HOOKS)
    reads = t.reads
    assert t.apply(full=False).chains_updated == ["cali-disp"]
    assert t.reads == reads  # not read: the edits are not seen yet (as in Felix) ...
    assert ids(lab, ns, "nft", "cali-OUTPUT") == [] and ids(lab, ns, "nft", "INPUT") == []
    ch = t.apply(full=True)  # ... until the resync
    assert ch.chains_updated == ["cali-OUTPUT"] and ch.hooks_rewritten == ["INPUT"]
    for chain, bodies in with_pods(3).items():
        assert ids(lab, ns, "nft", chain) == chain_rule_ids(chain, bodies)
    assert ids(lab, ns, "nft", "INPUT") == [hook_id(HOOKS[0])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_refused_on_a_stale_view_is_reread_and_retried(node, backend, monkeypatch):
    lab, ns = node
    t = IptablesTable("filter", backend, netns=ns)
    t.set_desired(with_pods(3), HOOKS)
    t.apply(full=True)
    ipt(lab, ns, backend, "-F", "cali-disp")  # behind our back: the view still says 3 rules
    spy = RunSpy(monkeypatch)
    t.set_desired(with_pods(2), HOOKS)  # the view plans "-D cali-disp 3": out of range now
    ch = t.apply(full=False)
    assert ch.changed
    assert [c.rsplit("-", 1)[1] for c in spy.calls] == ["restore", "save", "restore"]
    for chain, bodies in with_pods(2).items():
        assert ids(lab, ns, backend, chain) == chain_rule_ids(chain, bodies)
    assert not t.apply(full=True)


def random_states():
    names = [f"cali-r{i}" for i in range(5)]
    bodies = ["-j ACCEPT", "-p tcp -j RETURN", "-s 10.0.0.1 -j DROP", "-p udp", "-i cali0 -j ACCEPT"]

    @st.composite
    def one(draw):
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
        # jumps only to "later" chains: iptables refuses loops
        chains = {c: tuple(draw(st.lists(st.sampled_from(bodies + [f"-j {o}" for o in chosen if o > c]),
                                         max_size=4))) for c in chosen}
        hooks = tuple(Hook("filter", b, c) for b, c in zip(("INPUT", "OUTPUT"), chosen) if draw(st.booleans()))
        return chains, hooks
    return st.lists(one(), min_size=1, max_size=5)


@pytest.fixture
def two_nodes(make_lab):
    lab = make_lab(2)
    a, b = (n.ns for n in lab.nodes)
    return lab, IptablesTable("filter", "nft", netns=a), IptablesTable("filter", "nft", netns=b)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(states=random_states())
def test_view_based_applies_end_like_reading_every_time(two_nodes, states):
    """Node A's table trusts its view (full=False); node B's reads before every apply.
    After every step both kernels hold the same ids, those of the desired state."""
    lab, viewed, reading = two_nodes
    reads = viewed.reads
    hooks_before, hook_changes = None, 0
    for chains, hooks in states:
        for t, full in ((viewed, False), (reading, True)):
            t.set_desired(chains, list(hooks))
            t.apply(full=full)
        hook_changes += hooks != hooks_before
        hooks_before = hooks
        got_a, got_b = our_ids(lab, viewed.netns, "nft"), our_ids(lab, reading.netns, "nft")
        assert got_a == got_b
        for c, bodies in chains.items():
            assert got_a[c] == chain_rule_ids(c, bodies)
    # Only a first apply or a change of hooks (built-in chains: planned from a read) reads.
    assert viewed.reads - reads <= hook_changes + (reads == 0)
