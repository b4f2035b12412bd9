"""ipsets: names, members, sharing, and label changes touching members only."""
import pytest

from felix_agent.calc.ipsets import NamedPortSet, NetSet, SelectorSet, hashed_name, net_members
from felix_agent.calc.selectors import PeerSelector
from felix_agent.model import Namespace, NamedPort, Pod, PolicyPort
from tests.unit.test_calc_fixtures import (
    cluster_of, from_pods, ingress, egress, pod, rule_, sel, state, upd,
)

HTTP8080 = (NamedPort("http", 8080),)
HTTP9090 = (NamedPort("http", 9090), NamedPort("dns", 53, "UDP"))


def sets_of(st, prefix):
    return {name: s for name, s in st.ipsets.items() if name.startswith(prefix)}


def base_cluster(*extra):
    return cluster_of(
        Namespace("ns", (("env", "prod"),)),
        pod("ns", "web1", "10.0.0.1", labels={"app": "web"}, ports=HTTP8080),
        pod("ns", "web2", "10.0.1.1", node="n2", labels={"app": "web"}, ports=HTTP9090),
        pod("ns", "cli", "10.0.2.1", node="n3", labels={"app": "cli"}, ports=HTTP9090),
        *extra)


def test_selector_set_holds_pods_of_every_node_and_is_shared():
    allow_cli = rule_(from_pods(sel(app="cli")))
    c = base_cluster(ingress("ns", "a", sel(app="web"), allow_cli),
                     ingress("ns", "b", sel(), allow_cli, rule_(from_pods(sel(app="web")))))
    st = state(c)
    s = sets_of(st, "cali40s:")
    cli_set = SelectorSet(PeerSelector(sel(app="cli"), namespace="ns")).name
    web_set = SelectorSet(PeerSelector(sel(app="web"), namespace="ns")).name
    assert set(s) == {cli_set, web_set}  # two policies, one set for the shared peer
    assert s[cli_set].members == {"10.0.2.1"} and s[cli_set].type == "hash:net"
    assert s[web_set].members == {"10.0.0.1", "10.0.1.1"}  # web2 lives on n2
    chains = st.chains["filter"]
    users = [name for name, rules in chains.items() if any(cli_set in r for r in rules)]
    assert len(users) == 2  # both policy chains name the one set


def test_named_port_members_resolve_per_destination_pod():
    # ingress: the selected pods' own numbers for "http" (web1 8080, web2 9090)
    c = base_cluster(ingress("ns", "a", sel(app="web"), rule_(ports=(PolicyPort("TCP", "http"),))))
    (s,) = sets_of(state(c), "cali40n:").values()
    assert s.type == "hash:ip,port"
    assert s.members == {"10.0.0.1,tcp:8080", "10.0.1.1,tcp:9090"}
    # egress to cli's "http" and "dns": the peer's numbers, with the protocol in the member
    c = base_cluster(egress("ns", "e", sel(app="web"),
                            rule_(from_pods(sel(app="cli")), ports=(PolicyPort("TCP", "http"), PolicyPort("UDP", "dns")))))
    got = {s.members for s in sets_of(state(c), "cali40n:").values()}
    assert got == {frozenset({"10.0.2.1,tcp:9090"}), frozenset({"10.0.2.1,udp:53"})}
    # a name with the wrong protocol does not resolve
    c = base_cluster(ingress("ns", "a", sel(app="web"), rule_(ports=(PolicyPort("UDP", "http"),))))
    (s,) = sets_of(state(c), "cali40n:").values()
    assert s.members == frozenset()


def test_label_change_changes_members_only():
    pol = ingress("ns", "a", sel(app="web"), rule_(from_pods(sel(app="cli"), ns=sel(env="prod"))),
                  rule_(ports=(PolicyPort("TCP", "http"),)))
    c = base_cluster(pol, pod("ns", "other", "10.0.3.1", node="n2", labels={"app": "x"}, ports=HTTP8080))
    before = state(c)
    # a remote pod becomes a cli; a namespace label changes; another pod becomes a web
    c.apply(upd(Pod("ns", "other", labels=(("app", "cli"),), node="n2", ips=("10.0.3.1",), ports=HTTP8080)))
    mid = state(c)
    assert mid.chains == before.chains
    assert mid.ipsets != before.ipsets and set(mid.ipsets) == set(before.ipsets)
    c.apply(upd(Namespace("ns", (("env", "dev"),))))
    after = state(c)
    assert after.chains == before.chains
    peer_set = SelectorSet(PeerSelector(sel(app="cli"), sel(env="prod"))).name
    assert mid.ipsets[peer_set].members == {"10.0.2.1", "10.0.3.1"}
    assert after.ipsets[peer_set].members == frozenset()


@pytest.mark.parametrize("cidrs, expected", [
    (["10.0.0.0/8"], ("10.0.0.0/8",)),
    (["10.1.2.3/8"], ("10.0.0.0/8",)),  # host bits cleared, as ipset stores it
    (["10.0.0.5/32", "10.0.0.5"], ("10.0.0.5",)),  # /32 listed as a plain address
    (["0.0.0.0/0"], ("0.0.0.0/1", "128.0.0.0/1")),  # hash:net refuses /0
    (["192.168.0.0/16", "10.0.0.0/8"], ("10.0.0.0/8", "192.168.0.0/16")),
])
def test_net_members(cidrs, expected):
    assert net_members(cidrs) == expected


@pytest.mark.parametrize("bad", ["fd00::/8", "10.0.0.0/33", "nope"])
def test_net_members_refuses_non_ipv4(bad):
    with pytest.raises(ValueError):
        net_members([bad])


def test_names_fit_and_differ():
    sels = [PeerSelector(sel(app=str(i)), namespace="n" * 63) for i in range(50)]
    names = {SelectorSet(s).name for s in sels}
    names |= {NamedPortSet(s, "p" * 15, proto).name for s in sels for proto in ("TCP", "UDP")}
    names.add(NetSet(("10.0.0.0/8",)).name)
    assert len(names) == 50 + 100 + 1
    assert all(len(n) <= 31 for n in names)
    assert hashed_name("cali40s:", "x") == hashed_name("cali40s:", "x")
