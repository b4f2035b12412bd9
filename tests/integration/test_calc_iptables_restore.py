"""The calc's chains and ipsets are valid for the real tools, on iptables-nft and -legacy.

A cluster that uses every rule shape the calc can emit (named ports, endPort, SCTP, UDP,
ipBlock with except, /0, several policies, egress, default deny, split dispatch, floating
IPs, natOutgoing, cluster policies of both tiers with Accept/Deny/Pass, named ports of any
protocol, networks and nodes peers) is rendered; inside a lab node namespace the ipsets go through
`ipset restore` and the chains through `<backend>-restore --test`, then are loaded for
real and read back: every rule body and set member must come back exactly as written
(the canonical form the drivers diff against).  The pods are dual-stack and the policies
carry IPv6 blocks too, so the ip6tables filter table and the cali60 sets go the same way.
"""
import shutil

import pytest

from felix_agent.calc.desired import DesiredState
from felix_agent.model import (
    ClusterNetworkPolicy, IPPool, NamedPort, Namespace, NamespacedPods, NetworkPolicy, Node, PolicyPort, PolicyRule,
    TierPeer, TierPort, TierRule,
)
from tests.unit.test_calc_fixtures import (
    cluster_of, egress, from_block, from_pods, ingress, pod, rule_, sel, state,
)

pytestmark = pytest.mark.root

BACKENDS = ["iptables", "iptables-legacy"]


def rich_state() -> DesiredState:
    ports = (NamedPort("http", 8080), NamedPort("dns", 53, "UDP"), NamedPort("sig", 2905, "SCTP"))
    pods = [pod("prod", f"web{i}", f"10.65.{i // 200}.{i % 200 + 2}", labels={"app": "web"}, ports=ports,
                fips='["172.16.0.%d"]' % (i + 1) if i < 3 else None, ip6=f"fd65::{i + 2:x}") for i in range(70)]
    pods += [pod("prod", "db", "10.65.9.2", node="n2", labels={"app": "db"}, ports=ports, ip6="fd65::9:2"),
             pod("dev", "tool", "10.66.0.2", node="n3", labels={"app": "tool"})]
    everything = PolicyRule(
        peers=(from_pods(sel(app="db")), from_pods(sel(app="tool"), ns=sel(env="dev")),
               from_pods(ns=sel()), from_block("10.0.0.0/8", "10.65.9.0/24", "10.66.0.2/32"),
               from_block("0.0.0.0/0", "192.168.0.0/16"), from_block("172.16.5.5/32"),
               from_block("fd00::/8", "fd65::9:0/112", "fd66::2/128"), from_block("::/0", "fd99::/16"),
               from_block("2001:db8::5/128")),
        ports=(PolicyPort("TCP", 80), PolicyPort("TCP", 8000, 8100), PolicyPort("UDP", "dns"),
               PolicyPort("SCTP", 2905), PolicyPort("SCTP", "sig"), PolicyPort("TCP", "http"),
               PolicyPort("UDP")))
    policies = [
        ingress("prod", "everything", sel(app="web"), everything, PolicyRule()),
        egress("prod", "egress", sel(app="web"), everything, rule_(ports=(PolicyPort("TCP", "http"),))),
        NetworkPolicy("prod", "deny-all", sel(), policy_types=("Ingress", "Egress")),
        ingress("prod", "many-ports", sel(), rule_(ports=tuple(PolicyPort("TCP", 1000 + 10 * i) for i in range(20))),
                rule_(ports=(PolicyPort("TCP", 3000, 3100),))),
    ]
    dev, web = TierPeer(namespaces=sel(env="dev")), TierPeer(pods=NamespacedPods(sel(), sel(app="web")))
    tiers = [
        ClusterNetworkPolicy("admin", "Admin", 10, TierPeer(namespaces=sel(env="prod")), ingress=(
            TierRule("Pass", (dev,), (TierPort("TCP", 80), TierPort("UDP", 50, 60))),
            TierRule("Deny", (web, dev), (TierPort(None, name="http"),)),
            TierRule("Accept", (TierPeer(namespaces=sel()),))), egress=(
            TierRule("Deny", (TierPeer(networks=("0.0.0.0/0", "fd00::/8")),), (TierPort("SCTP", 2905),)),
            TierRule("Accept", (TierPeer(nodes=sel(role="ctl")), TierPeer(networks=("10.0.0.0/8",)))))),
        ClusterNetworkPolicy("baseline", "Baseline", 1000, web, ingress=(TierRule("Deny", (dev,)),)),
    ]
    c = cluster_of(Namespace("prod", (("env", "prod"),)), Namespace("dev", (("env", "dev"),)),
                   IPPool("pool", "10.65.0.0/16", nat_outgoing=True), IPPool("other", "10.66.0.0/16"),
                   Node("n1", "192.168.100.11/24", "fd00:100::11/64", labels=(("role", "ctl"),)),
                   Node("n2", "192.168.100.12/24"),
                   *pods, *policies, *tiers)
    errors = []
    st = state(c, errors=errors)
    assert errors == []
    return st


def restore_text(st: DesiredState, table: str, v6: bool = False) -> str:
    chains = (st.chains6 if v6 else st.chains)[table]
    lines = [f"*{table}"] + [f":{name} - [0:0]" for name in chains]
    for name, bodies in chains.items():
        lines += [f"-A {name} {body}" for body in bodies]
    lines += [f"-A {h.builtin} -j {h.target}" for h in (st.hooks6 if v6 else st.hooks) if h.table == table]
    return "\n".join(lines + ["COMMIT", ""])


def ipset_text(st: DesiredState) -> str:
    lines = []
    for s in st.ipsets.values():
        lines.append(f"create {s.name} {s.type} family {s.family}")
        lines += [f"add {s.name} {m}" for m in sorted(s.members)]
    return "\n".join(lines) + "\n"


def saved_rules(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("-A "):
            _, chain, body = line.split(" ", 2)
            out.setdefault(chain, []).append(body)
    return out


@pytest.fixture(scope="module")
def st():
    return rich_state()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chains_and_sets_load_and_read_back_verbatim(make_lab, st, backend):
    missing = [t for t in ("ipset", f"{backend}-restore", f"{backend}-save") if shutil.which(t) is None]
    if missing:
        pytest.skip("missing tools: " + ", ".join(missing))
    lab = make_lab(1)
    ns = lab.nodes[0].ns  # everything below happens inside this namespace only

    lab.exec(ns, "ipset", "restore", input=ipset_text(st))
    saved_sets: dict[str, set[str]] = {}
    for line in lab.exec(ns, "ipset", "save").stdout.splitlines():
        if line.startswith("add "):
            _, name, member = line.split(" ", 2)
            saved_sets.setdefault(name, set()).add(member)
    for s in st.ipsets.values():
        assert saved_sets.get(s.name, set()) == s.members, s.name

    ip6 = backend.replace("iptables", "ip6tables")
    for tool, table, v6 in ((backend, "filter", False), (backend, "nat", False), (ip6, "filter", True)):
        text = restore_text(st, table, v6)
        lab.exec(ns, f"{tool}-restore", "--test", "--noflush", input=text)
        lab.exec(ns, f"{tool}-restore", "--noflush", input=text)
        got = saved_rules(lab.exec(ns, f"{tool}-save", "-t", table).stdout)
        for name, bodies in (st.chains6 if v6 else st.chains)[table].items():
            assert got.get(name, []) == list(bodies), f"{tool} {table} {name}"
        hooks = [h for h in (st.hooks6 if v6 else st.hooks) if h.table == table]
        for builtin in {h.builtin for h in hooks}:
            assert got[builtin] == [f"-j {h.target}" for h in hooks if h.builtin == builtin]


def test_the_rich_state_covers_every_shape(st):
    """Guards the test above against silently losing coverage when the calc changes."""
    text = "\n".join(r for table in st.chains.values() for rules in table.values() for r in rules)
    for needle in ("-p sctp -m sctp --dport", "-m multiport --dports", "80,8000:8100", "-m tcp --dport 3000:3100", "-p udp ",
                   "dst,dst", "! --match-set cali40e:", "! --match-set cali40wl-src src,src", "-g cali-from-wl-dispatch-", "-j DNAT", "-j SNAT",
                   "-j MASQUERADE", "-s 10.0.0.0/8", "-d 172.16.5.5/32"):
        assert needle in text, needle
    assert any(s.type == "hash:ip,port" and any(",sctp:" in m for m in s.members) for s in st.ipsets.values())
    text6 = "\n".join(r for rules in st.chains6["filter"].values() for r in rules)
    for needle in ("! --match-set cali60e:", "! --match-set cali60wl-src src,src", "-s fd00::/8", "-d 2001:db8::5/128",
                   "--match-set cali60s:", "dst,dst", "-p ipv6-icmp -m icmp6 --icmpv6-type 135"):
        assert needle in text6, needle
    assert "cali40" not in text6 and "cali60" not in text and "fd00::" not in text and "10.0.0.0/8" not in text6
    assert any(s.family == "inet6" and s.type == "hash:ip,port" and s.members for s in st.ipsets.values())
    assert any(s.family == "inet6" and s.name.startswith("cali60h:") and s.members == {"fd00:100::11"}
               for s in st.ipsets.values())
