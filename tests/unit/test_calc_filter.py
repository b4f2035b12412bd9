"""dataplane_state: the filter layout, endpoint chains, dispatch and growth."""
import pytest

from felix_agent.calc.desired import Hook
from felix_agent.calc.filter import CalcConfig
from felix_agent.calc.names import CLEAR_ACCEPT_MARK, RETURN_IF_ACCEPTED
from felix_agent.model import NetworkPolicy, PolicyPort, WorkloadEndpoint
from tests.unit.test_calc_fixtures import (
    cluster_of, egress, from_pods, iface_of, ingress, pod, rule_, sel, state,
)

WEB_IF = iface_of("ns", "web")


def web_cluster(*extra):
    return cluster_of(pod("ns", "web", "10.0.0.1", labels={"app": "web"}),
                      pod("ns", "cli", "10.0.0.2", labels={"app": "cli"}),
                      pod("ns", "far", "10.0.1.1", node="n2", labels={"app": "web"}), *extra)


def test_hooks_and_static_chains():
    st = state(web_cluster())
    assert set(st.hooks) == {
        Hook("filter", "INPUT", "cali-INPUT"), Hook("filter", "FORWARD", "cali-FORWARD"),
        Hook("filter", "OUTPUT", "cali-OUTPUT"), Hook("nat", "PREROUTING", "cali-PREROUTING"),
        Hook("nat", "OUTPUT", "cali-OUTPUT"), Hook("nat", "POSTROUTING", "cali-POSTROUTING"),
        Hook("raw", "PREROUTING", "cali-PREROUTING"),
        Hook("filter", "FORWARD", "cali-FORWARD-accept", position="bottom")}
    f = st.chains["filter"]
    assert f["cali-FORWARD"][:2] == ("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                                     "-m conntrack --ctstate INVALID -j DROP")
    assert "-i cali+ -j cali-from-wl-dispatch" in f["cali-FORWARD"]
    assert "-o cali+ -j cali-to-wl-dispatch" in f["cali-FORWARD"]
    # Allowed workload traffic is marked and returned, never accepted in cali-FORWARD (the
    # rest of FORWARD, kube-proxy's REJECT, must see it); the bottom hook accepts it.
    assert not [r for r in f["cali-FORWARD"][2:] if r.endswith("-j ACCEPT")]
    assert f["cali-FORWARD"][-2:] == ("-i cali+ -j MARK --set-xmark 0x40000/0x40000",
                                      "-o cali+ -j MARK --set-xmark 0x40000/0x40000")
    assert f["cali-FORWARD-accept"] == ("-m mark --mark 0x40000/0x40000 -j ACCEPT",)
    assert f["cali-INPUT"][-1] == "-i cali+ -g cali-wl-to-host"
    assert f["cali-wl-to-host"] == ("-j cali-from-wl-dispatch", "-j ACCEPT")
    assert f["cali-OUTPUT"] == ()  # the node reaches its own pods unhindered
    assert st.routes == frozenset()


@pytest.mark.parametrize("action", ["ACCEPT", "DROP"])
def test_loopback_guard_in_raw_for_both_families_whatever_the_settings(action):
    """Pods' packets to 127/8 and ::1 are dropped in raw PREROUTING before any routing
    decision, under every wl_to_host_action and with no endpoint at all."""
    for st in (state(web_cluster(), wl_to_host_action=action), state(cluster_of())):
        assert st.chains["raw"] == {"cali-PREROUTING": ("-i cali+ -d 127.0.0.0/8 -j DROP",)}
        assert st.chains6["raw"] == {"cali-PREROUTING": ("-i cali+ -d ::1/128 -j DROP",)}
        assert Hook("raw", "PREROUTING", "cali-PREROUTING") in st.hooks6


@pytest.mark.parametrize("action", ["ACCEPT", "DROP"])
def test_wl_to_host_action(action):
    st = state(web_cluster(), wl_to_host_action=action)
    assert st.chains["filter"]["cali-wl-to-host"][-1] == f"-j {action}"


@pytest.mark.parametrize("kw, message", [
    ({"node_name": "n1", "wl_to_host_action": "RETURN"}, "wl_to_host_action"),
    ({"node_name": ""}, "node_name"),
])
def test_bad_config_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        CalcConfig(**kw)


def test_anti_spoof_dispatch():
    multi = WorkloadEndpoint("ns", "multi", "n1", "c", "calimulti", ("10.0.0.7", "10.0.0.8", "fd00::7"))
    st = state(web_cluster(multi))
    f = st.chains["filter"]
    cli_if = iface_of("ns", "cli")
    # the (address, interface) pairs a local workload may send from: IPv4 only, none remote
    src = st.ipsets["cali40wl-src"]
    assert src.type == "hash:net,iface"
    assert src.members == {f"10.0.0.1,{WEB_IF}", f"10.0.0.2,{cli_if}", "10.0.0.7,calimulti", "10.0.0.8,calimulti"}
    # anything else from cali+ is dropped first; then each interface goes to its own chain
    assert f["cali-from-wl-dispatch"] == (
        "-m set ! --match-set cali40wl-src src,src -j DROP",
        *sorted([f"-i {WEB_IF} -g cali-fw-{WEB_IF}", f"-i {cli_if} -g cali-fw-{cli_if}",
                 "-i calimulti -g cali-fw-calimulti"], key=lambda r: r.split()[1]),
        "-j DROP")
    assert not any("10.0.0" in r for r in f["cali-from-wl-dispatch"])  # no address in any rule
    assert f["cali-to-wl-dispatch"][-1] == "-j DROP"
    assert f"-o {WEB_IF} -g cali-tw-{WEB_IF}" in f["cali-to-wl-dispatch"]
    # the remote pod has no chains here
    assert not any(iface_of("ns", "far") in name for name in f)


def test_scheduled_pod_is_programmed_before_its_add_and_the_add_touches_only_ipsets():
    """A pod scheduled here but not yet wired gets its chains under the name the CNI plugin
    will give its veth, but no (address, interface) pair: nothing passes its dispatch yet.
    Its ADD (the WorkloadEndpoint) then changes ipsets only, never a chain."""
    pol = ingress("ns", "allow-cli", sel(app="web"), rule_(from_pods(sel(app="cli"))))
    before = state(web_cluster(pol, *pod("ns", "new", "10.0.0.3", labels={"app": "web"}, wired=False)))
    after = state(web_cluster(pol, *pod("ns", "new", "10.0.0.3", labels={"app": "web"})))
    new_if = iface_of("ns", "new")
    f = before.chains["filter"]
    assert f[f"cali-tw-{new_if}"] == (CLEAR_ACCEPT_MARK, f"-j cali-pi-{pol.id}", RETURN_IF_ACCEPTED, "-j DROP")
    assert f"-i {new_if} -g cali-fw-{new_if}" in f["cali-from-wl-dispatch"]
    assert f"-o {new_if} -g cali-tw-{new_if}" in f["cali-to-wl-dispatch"]
    assert not any(new_if in m for m in before.ipsets["cali40wl-src"].members)
    assert before.chains == after.chains
    assert after.ipsets["cali40wl-src"].members - before.ipsets["cali40wl-src"].members == {f"10.0.0.3,{new_if}"}
    # a pod of another node, or one that runs in the host's network, gets nothing here
    others = state(web_cluster(*pod("ns", "away", "10.0.1.9", node="n2", wired=False)))
    assert not any(iface_of("ns", "away") in name for name in others.chains["filter"])


def test_finished_pod_keeps_chains_only_while_a_sandbox_wires_it():
    """A Job's completed pod (phase Succeeded/Failed) lingers as a Pod object: once its
    sandbox is gone (no WorkloadEndpoint) it has no chains and matches no policy; while its
    endpoint still exists (DEL not yet run) its chains stay."""
    import dataclasses
    pol = ingress("ns", "allow-cli", sel(app="web"), rule_(from_pods(sel(app="cli"))))
    done_pod, done_wep = pod("ns", "done", "10.0.0.4", labels={"app": "web"})
    finished = dataclasses.replace(done_pod, finished=True, ips=())
    done_if = iface_of("ns", "done")
    gone = state(web_cluster(pol, finished)).chains["filter"]
    assert not any(done_if in name or done_if in " ".join(rules) for name, rules in gone.items())
    # the same pod before it finished, not yet wired: chains programmed ahead of its ADD
    assert f"cali-tw-{done_if}" in state(web_cluster(pol, done_pod)).chains["filter"]
    kept = state(web_cluster(pol, finished, done_wep))
    assert f"cali-tw-{done_if}" in kept.chains["filter"]
    assert f"10.0.0.4,{done_if}" in kept.ipsets["cali40wl-src"].members


def test_no_policy_means_allow():
    f = state(web_cluster()).chains["filter"]
    assert f[f"cali-tw-{WEB_IF}"] == () and f[f"cali-fw-{WEB_IF}"] == ()
    assert not any(name.startswith(("cali-pi-", "cali-po-")) for name in f)


def test_policies_are_a_union_in_key_order_then_drop():
    a = ingress("ns", "a", sel(app="web"), rule_(from_pods(sel(app="cli"))))
    b = ingress("ns", "b", sel(), rule_(ports=(PolicyPort("TCP", 80),)))
    e = egress("ns", "e", sel(app="web"))  # default deny egress for web
    f = state(web_cluster(a, b, e)).chains["filter"]
    assert f[f"cali-tw-{WEB_IF}"] == (CLEAR_ACCEPT_MARK, f"-j cali-pi-{a.id}", RETURN_IF_ACCEPTED,
                                      f"-j cali-pi-{b.id}", RETURN_IF_ACCEPTED, "-j DROP")
    assert f[f"cali-fw-{WEB_IF}"] == (CLEAR_ACCEPT_MARK, f"-j cali-po-{e.id}", RETURN_IF_ACCEPTED, "-j DROP")
    assert f[f"cali-po-{e.id}"] == ()  # no rules: nothing accepted, the endpoint chain drops
    cli_if = iface_of("ns", "cli")
    assert f[f"cali-tw-{cli_if}"] == (CLEAR_ACCEPT_MARK, f"-j cali-pi-{b.id}", RETURN_IF_ACCEPTED, "-j DROP")
    assert f[f"cali-fw-{cli_if}"] == ()


def test_policy_chains_only_for_policies_selecting_local_endpoints():
    remote_only = ingress("other", "x", sel(), rule_())
    f = state(web_cluster(remote_only, pod("other", "p", "10.0.5.5", node="n2"))).chains["filter"]
    assert f"cali-pi-{remote_only.id}" not in f


def test_chains_grow_with_policies_and_endpoints_not_with_pairs():
    """N local pods x M policies all selecting all of them: O(N + M) rules, not O(N*M)."""
    def count(n_pods, n_pols):
        recs = [pod("ns", f"p{i}", f"10.0.{i // 250}.{i % 250 + 1}", labels={"app": "x"}) for i in range(n_pods)]
        pols = [ingress("ns", f"pol{j}", sel(), rule_(from_pods(sel(app=f"peer{j}")), ports=(PolicyPort("TCP", 80 + j),)))
                for j in range(n_pols)]
        st = state(cluster_of(*recs, *pols))
        f = st.chains["filter"]
        policy_rules = sum(len(r) for name, r in f.items() if name.startswith("cali-pi-"))
        total = sum(len(r) for r in f.values())
        return total, policy_rules, len(st.ipsets)

    base, pol_base, _ = count(10, 10)
    more_pods, pol_pods, _ = count(20, 10)
    more_pols, pol_pols, sets = count(10, 20)
    assert pol_pods == pol_base == 2 * 10  # one mark+return per policy rule, shared
    assert pol_pols == 2 * 20
    # each extra pod costs its own chains' rules (about 2 per policy + dispatch), not per pair
    per_pod = (more_pods - base) / 10
    per_pol = (more_pols - base) / 10
    assert per_pod <= 2 * 10 + 4
    assert per_pol <= 2 + 2 * 10  # its chain + one jump/return per endpoint
    # one peer set per policy and family, plus the pool/host sets and cali40wl-src, cali60wl-src
    assert sets == 2 * 20 + 3 + 2


def test_dispatch_is_split_with_many_endpoints():
    recs = [pod("ns", f"p{i}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(200)]
    f = state(cluster_of(*recs)).chains["filter"]
    top = f["cali-from-wl-dispatch"]
    subs = [n for n in f if n.startswith("cali-from-wl-dispatch-")]
    assert len(subs) == 16 and len(top) == 18 and top[-1] == "-j DROP"
    assert top[0] == "-m set ! --match-set cali40wl-src src,src -j DROP"  # before any split
    assert all(f[s][-1] == "-j DROP" for s in subs)
    assert sum(len(f[s]) - 1 for s in subs) == 200  # every endpoint exactly once
    for rule in top[1:-1]:
        key = rule.split()[1][len("cali"):-1]
        assert rule == f"-i cali{key}+ -g cali-from-wl-dispatch-{key}"
        assert all(r.startswith(f"-i cali{key}") for r in f[f"cali-from-wl-dispatch-{key}"][:-1])
    assert len([n for n in f if n.startswith("cali-to-wl-dispatch-")]) == 16


def test_names_fit_iptables_limits():
    recs = [pod("n" * 63, "p" * 253, "10.0.0.1")]
    pol = NetworkPolicy("n" * 63, "q" * 253, sel(), policy_types=("Ingress", "Egress"))
    many = [pod("ns", f"p{i}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(100)]
    st = state(cluster_of(*recs, pol, *many))
    names = [n for table in st.chains.values() for n in table]
    assert max(len(n) for n in names) <= 28
    assert max(len(n) for n in st.ipsets) <= 31


def test_bad_and_duplicate_interfaces_are_reported_and_left_out():
    bad = WorkloadEndpoint("ns", "bad", "n1", "c", "eth0", ("10.0.0.9",))
    long = WorkloadEndpoint("ns", "long", "n1", "c", "cali0123456789abc", ("10.0.0.10",))
    dup = WorkloadEndpoint("ns", "dup", "n1", "c", WEB_IF, ("10.0.0.11",))
    errors = []
    st = state(web_cluster(bad, long, dup), errors=errors)
    f = st.chains["filter"]
    # two endpoints on one interface: the first by key (ns/dup) keeps it, ns/web is reported
    assert [e.split(":")[0] for e in errors] == ["endpoint ns/bad", "endpoint ns/long", "endpoint ns/web"]
    assert "already used by ns/dup" in errors[2]
    assert "cali-fw-eth0" not in f
    # the skipped ns/web may not send from its address through the interface ns/dup kept
    assert not any(m.startswith("10.0.0.1,") for m in st.ipsets["cali40wl-src"].members)
    assert f"10.0.0.11,{WEB_IF}" in st.ipsets["cali40wl-src"].members


def test_endpoint_of_another_node_in_wep_wins_over_pod_node():
    w = WorkloadEndpoint("ns", "web", "n2", "c", WEB_IF, ("10.0.0.1",))
    f = state(cluster_of(w)).chains["filter"]
    assert f"cali-tw-{WEB_IF}" not in f
