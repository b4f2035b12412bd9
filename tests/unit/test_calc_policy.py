"""Policy -> chain text, one semantic per case."""
import pytest

from felix_agent.calc.ipsets import NamedPortSet, NetSet, SelectorSet, net_members
from felix_agent.calc.names import RETURN_IF_ACCEPTED, SET_ACCEPT_MARK
from felix_agent.calc.policy import policy_chains
from felix_agent.calc.selectors import ALL_PODS, PeerSelector
from felix_agent.model import NetworkPolicy, PolicyPeer, PolicyPort, PolicyRule
from tests.unit.test_calc_fixtures import egress, from_block, from_pods, ingress, rule_, sel

WEB = sel(app="web")
CLI_SEL = PeerSelector(sel(app="cli"), namespace="ns")
CLI = SelectorSet(CLI_SEL).name
WEB_SEL = PeerSelector(WEB, namespace="ns")


def lines(policy: NetworkPolicy, direction: str = "ingress") -> list[str]:
    """The chain's match parts, with the mark/return pair each rule carries checked and removed."""
    pc = policy_chains(policy)
    assert pc.errors == ()
    (chain,) = [rules for name, rules in pc.chains.items() if name.startswith(
        "cali-pi-" if direction == "ingress" else "cali-po-")]
    assert all(r == RETURN_IF_ACCEPTED for r in chain[1::2])
    out = []
    for r in chain[::2]:
        assert r.endswith(SET_ACCEPT_MARK)
        out.append(r[: -len(SET_ACCEPT_MARK)].strip())
    return out


def P(proto="TCP", port=None, end=None):
    return PolicyPort(proto, port, end)


@pytest.mark.parametrize("rule, expected", [
    # no from, no ports: everything
    (PolicyRule(), [""]),
    # peer only
    (rule_(from_pods(sel(app="cli"))), [f"-m set --match-set {CLI} src"]),
    # port only; protocol defaults were already TCP in the model
    (rule_(ports=(P(port=80),)), ["-p tcp -m tcp --dport 80"]),
    # several ports of a protocol: multiport, endPort as a range
    (rule_(ports=(P(port=80), P(port=8000, end=8080))), ["-p tcp -m multiport --dports 80,8000:8080"]),
    # endPort alone: --dport a:b ; endPort equal to port: a single port
    (rule_(ports=(P(port=1000, end=2000),)), ["-p tcp -m tcp --dport 1000:2000"]),
    (rule_(ports=(P(port=53, end=53),)), ["-p tcp -m tcp --dport 53"]),
    # protocols
    (rule_(ports=(P("UDP", 53),)), ["-p udp -m udp --dport 53"]),
    (rule_(ports=(P("SCTP", 9000),)), ["-p sctp -m sctp --dport 9000"]),
    (rule_(ports=(P("SCTP", 1, 2), P("SCTP", 9))), ["-p sctp -m multiport --dports 1:2,9"]),
    # protocol without port: every port of it, and it makes numeric ports of it redundant
    (rule_(ports=(P("UDP"),)), ["-p udp"]),
    (rule_(ports=(P("TCP", 80), P("TCP"))), ["-p tcp"]),
    # peers x ports
    (rule_(from_pods(sel(app="cli")), from_block("192.168.0.0/16"), ports=(P(port=80), P("UDP", 53))),
     [f"-p tcp -m set --match-set {CLI} src -m tcp --dport 80",
      f"-p udp -m set --match-set {CLI} src -m udp --dport 53",
      "-s 192.168.0.0/16 -p tcp -m tcp --dport 80",
      "-s 192.168.0.0/16 -p udp -m udp --dport 53"]),
    # ipBlock: host bits cleared, /0 is no address match at all, except through a set
    (rule_(from_block("10.1.2.3/8")), ["-s 10.0.0.0/8"]),
    (rule_(from_block("10.0.0.7/32")), ["-s 10.0.0.7/32"]),
    (rule_(from_block("0.0.0.0/0", "10.0.0.0/8", "192.168.1.1/32")),
     [f"-m set ! --match-set {NetSet(net_members(['10.0.0.0/8', '192.168.1.1/32'])).name} src"]),
    # IPv6 blocks have no IPv4 meaning: skipped, and a rule of only those allows nothing
    (rule_(from_block("fd00::/8")), []),
    (rule_(from_block("fd00::/8"), from_block("10.0.0.0/8")), ["-s 10.0.0.0/8"]),
    # named port on ingress: the selected pods' own port numbers
    (rule_(ports=(P(port="http"),)),
     [f"-p tcp -m set --match-set {NamedPortSet(WEB_SEL, 'http', 'TCP').name} dst,dst"]),
    (rule_(from_pods(sel(app="cli")), ports=(P("UDP", "dns"),)),
     [f"-p udp -m set --match-set {CLI} src -m set --match-set {NamedPortSet(WEB_SEL, 'dns', 'UDP').name} dst,dst"]),
])
def test_ingress_rule_text(rule, expected):
    assert lines(ingress("ns", "p", WEB, rule)) == expected


@pytest.mark.parametrize("rule, expected", [
    (PolicyRule(), [""]),
    (rule_(from_pods(sel(app="cli"))), [f"-m set --match-set {CLI} dst"]),
    (rule_(from_block("10.0.0.0/8", "10.1.0.0/16")),
     [f"-d 10.0.0.0/8 -m set ! --match-set {NetSet(('10.1.0.0/16',)).name} dst"]),
    # named port on egress with a selector peer: the peer's pods' ports; the ip,port set
    # also stands for the peer itself
    (rule_(from_pods(sel(app="cli")), ports=(P(port="http"),)),
     [f"-p tcp -m set --match-set {NamedPortSet(CLI_SEL, 'http', 'TCP').name} dst,dst"]),
    # named port with no peer / an ipBlock peer: any pod's port of that name
    (rule_(ports=(P(port="http"),)),
     [f"-p tcp -m set --match-set {NamedPortSet(ALL_PODS, 'http', 'TCP').name} dst,dst"]),
    (rule_(from_block("10.0.0.0/8"), ports=(P(port="http"),)),
     [f"-d 10.0.0.0/8 -p tcp -m set --match-set {NamedPortSet(ALL_PODS, 'http', 'TCP').name} dst,dst"]),
])
def test_egress_rule_text(rule, expected):
    assert lines(egress("ns", "p", WEB, rule), "egress") == expected


def test_policy_types_decide_which_chains_exist():
    r = rule_(from_pods(sel(app="cli")))
    both = NetworkPolicy("ns", "p", WEB, ingress=(r,), egress=(r,), policy_types=("Ingress", "Egress"))
    only_in = NetworkPolicy("ns", "p", WEB, ingress=(r,), egress=(r,), policy_types=("Ingress",))
    pid = both.id
    assert set(policy_chains(both).chains) == {f"cali-pi-{pid}", f"cali-po-{pid}"}
    # egress rules of a policy without the Egress type are ignored, as the API says
    assert set(policy_chains(only_in).chains) == {f"cali-pi-{pid}"}


def test_default_deny_is_an_empty_chain():
    deny = NetworkPolicy("ns", "deny", sel(), policy_types=("Ingress", "Egress"))
    assert dict(policy_chains(deny).chains) == {f"cali-pi-{deny.id}": (), f"cali-po-{deny.id}": ()}


def test_rules_are_alternatives_in_order():
    p = ingress("ns", "p", WEB, rule_(ports=(P(port=80),)), rule_(from_block("10.0.0.0/8")))
    assert lines(p) == ["-p tcp -m tcp --dport 80", "-s 10.0.0.0/8"]


def test_multiport_is_split_at_fifteen():
    ports = tuple(P(port=1000 + i) for i in range(14)) + (P(port=2000, end=2001), P(port=3000))
    got = lines(ingress("ns", "p", WEB, rule_(ports=ports)))
    assert got == ["-p tcp -m multiport --dports " + ",".join(str(1000 + i) for i in range(14)),
                   "-p tcp -m multiport --dports 2000:2001,3000"]


def test_sets_are_reported_and_shared():
    r = rule_(from_pods(sel(app="cli")), ports=(P(port="http"),))
    pc = policy_chains(ingress("ns", "p", WEB, r, rule_(from_pods(sel(app="cli")))))
    assert pc.sets == (SelectorSet(CLI_SEL), NamedPortSet(WEB_SEL, "http", "TCP"))


def test_chain_names_fit():
    p = NetworkPolicy("a" * 63, "b" * 253, sel(), policy_types=("Ingress", "Egress"))
    assert all(len(name) <= 28 for name in policy_chains(p).chains)


@pytest.mark.parametrize("rule, message, remaining", [
    (rule_(ports=(P("ICMP", 1),)), "protocol 'ICMP'", []),
    (rule_(ports=(P(port=0),)), "port 0 is not in 1-65535", []),
    (rule_(ports=(P(port=70000),)), "not in 1-65535", []),
    (rule_(ports=(P(port=90, end=80),)), "endPort 80 must be in 90-65535", []),
    (rule_(ports=(P(port="http", end=90),)), "endPort with named port", []),
    (rule_(ports=(P(end=90),)), "endPort without port", []),
    # a broken port is dropped, never widened to "every port"
    (rule_(ports=(P(port=0), P(port=80))), "port 0", ["-p tcp -m tcp --dport 80"]),
    (rule_(from_block("10.0.0.0/33")), "is not a CIDR", []),
    (rule_(from_block("10.0.0.0/8", "bogus")), "except 'bogus'", []),
    (rule_(PolicyPeer()), "neither ipBlock nor a selector", []),
    # a broken peer is dropped, never widened to "every peer"
    (rule_(PolicyPeer(), from_block("10.0.0.0/8")), "neither", ["-s 10.0.0.0/8"]),
])
def test_bad_input_is_skipped_narrowly_with_an_error(rule, message, remaining):
    pc = policy_chains(ingress("ns", "bad", WEB, rule))
    assert any(message in e and "policy ns/bad" in e for e in pc.errors), pc.errors
    (chain,) = pc.chains.values()
    assert [r[: -len(SET_ACCEPT_MARK)].strip() for r in chain[::2]] == remaining


def test_unknown_policy_type_is_reported():
    pc = policy_chains(NetworkPolicy("ns", "p", WEB, policy_types=("Sideways",)))
    assert dict(pc.chains) == {} and "unknown policyType" in pc.errors[0]
