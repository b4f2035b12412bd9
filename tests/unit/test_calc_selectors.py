"""Selector semantics: podSelector/namespaceSelector exactly as Kubernetes defines them."""
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felix_agent.calc.selectors import ALL_PODS, PeerSelector, SelectorIndex, ipv4_addresses, selector_members
from felix_agent.model import LabelSelector, Namespace, PolicyPeer, SelectorRequirement
from tests.unit.test_calc_fixtures import cluster_of, pod, req, sel

NAMESPACES = [Namespace("prod", (("env", "prod"),)), Namespace("dev", (("env", "dev"),)), Namespace("bare")]
PODS = [
    pod("prod", "web", "10.0.0.1", labels={"app": "web", "tier": "front"}),
    pod("prod", "db", "10.0.0.2", node="n2", labels={"app": "db"}),
    pod("dev", "web", "10.0.1.1", labels={"app": "web"}),
    pod("dev", "tool", "10.0.1.2", labels={}),
    pod("bare", "web", "10.0.2.1", labels={"app": "web", "tier": "back"}),
]


def members(peer: PolicyPeer, policy_ns: str = "prod") -> set[str]:
    c = cluster_of(*NAMESPACES, *PODS)
    s = PeerSelector.of_peer(peer, policy_ns)
    return set(selector_members(s, c.endpoints(), c.namespaces))


@pytest.mark.parametrize("peer, expected", [
    # only podSelector: pods of the POLICY's namespace
    (PolicyPeer(pod_selector=sel(app="web")), {"10.0.0.1"}),
    (PolicyPeer(pod_selector=sel()), {"10.0.0.1", "10.0.0.2"}),
    # only namespaceSelector: every pod of the matching namespaces
    (PolicyPeer(namespace_selector=sel(env="dev")), {"10.0.1.1", "10.0.1.2"}),
    (PolicyPeer(namespace_selector=sel()), {"10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.1.2", "10.0.2.1"}),
    # both: podSelector within the matching namespaces
    (PolicyPeer(pod_selector=sel(app="web"), namespace_selector=sel()), {"10.0.0.1", "10.0.1.1", "10.0.2.1"}),
    (PolicyPeer(pod_selector=sel(app="web"), namespace_selector=sel(env="dev")), {"10.0.1.1"}),
    # the API server's automatic name label works even on unlabelled namespaces
    (PolicyPeer(namespace_selector=sel(**{"kubernetes.io/metadata.name": "bare"})), {"10.0.2.1"}),
    # operators
    (PolicyPeer(pod_selector=sel(req("app", "In", "web", "db"))), {"10.0.0.1", "10.0.0.2"}),
    (PolicyPeer(pod_selector=sel(req("tier", "NotIn", "front")), namespace_selector=sel()),
     {"10.0.0.2", "10.0.1.1", "10.0.1.2", "10.0.2.1"}),
    (PolicyPeer(pod_selector=sel(req("tier", "Exists")), namespace_selector=sel()), {"10.0.0.1", "10.0.2.1"}),
    (PolicyPeer(pod_selector=sel(req("app", "DoesNotExist")), namespace_selector=sel()), {"10.0.1.2"}),
    (PolicyPeer(namespace_selector=sel(req("env", "DoesNotExist"))), {"10.0.2.1"}),
    # matchLabels and expressions are ANDed
    (PolicyPeer(pod_selector=sel(req("tier", "Exists"), app="web"), namespace_selector=sel(req("env", "In", "prod"))),
     {"10.0.0.1"}),
    # nothing matches
    (PolicyPeer(pod_selector=sel(app="nope"), namespace_selector=sel()), set()),
])
def test_peer_semantics(peer, expected):
    assert members(peer) == expected


def test_pods_of_every_node_are_members_and_a_missing_namespace_record_still_counts():
    c = cluster_of(pod("ghost", "p", "10.9.0.1", node="n7"))  # no Namespace record yet
    assert selector_members(PeerSelector(namespaces=sel()), c.endpoints(), c.namespaces) == {"10.9.0.1"}
    assert selector_members(ALL_PODS, c.endpoints(), c.namespaces) == {"10.9.0.1"}


def test_ipv6_addresses_are_not_ipv4_members():
    from felix_agent.model import Pod
    c = cluster_of(Pod("a", "p", ips=("10.0.0.1", "fd00::1")))
    assert selector_members(PeerSelector(namespace="a"), c.endpoints(), c.namespaces) == {"10.0.0.1"}


def test_ipblock_and_empty_peers_have_no_selector():
    from felix_agent.model import IPBlock
    assert PeerSelector.of_peer(PolicyPeer(ip_block=IPBlock("10.0.0.0/8")), "a") is None
    assert PeerSelector.of_peer(PolicyPeer(), "a") is None


def test_canonical_text_distinguishes_scope():
    a = PeerSelector.of_peer(PolicyPeer(pod_selector=sel(app="x")), "a")
    b = PeerSelector.of_peer(PolicyPeer(pod_selector=sel(app="x")), "b")
    c = PeerSelector.of_peer(PolicyPeer(pod_selector=sel(app="x"), namespace_selector=sel()), "a")
    assert len({a.canonical(), b.canonical(), c.canonical()}) == 3
    # order of match_labels/expressions does not matter
    x = LabelSelector((("a", "1"), ("b", "2")), (SelectorRequirement("k", "In", ("y", "x")),))
    y = LabelSelector((("b", "2"), ("a", "1")), (SelectorRequirement("k", "In", ("x", "y")),))
    assert PeerSelector(x, namespace="n").canonical() == PeerSelector(y, namespace="n").canonical()


# --- property: the index agrees with a direct, naive reading of the Kubernetes rules -----

KEYS = ["a", "b", "c"]
VALS = ["1", "2"]
labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALS), max_size=3)
req_st = st.builds(
    SelectorRequirement, st.sampled_from(KEYS), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
    st.lists(st.sampled_from(VALS), max_size=2, unique=True).map(tuple))
selector_st = st.builds(
    lambda ml, me: LabelSelector(tuple(sorted(ml.items())), tuple(me)),
    st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALS), max_size=2),
    st.lists(req_st, max_size=2))


def reference_match(s: LabelSelector, labels: dict) -> bool:
    """Written from the API docs, independently of LabelSelector.matches."""
    if any(labels.get(k) != v for k, v in s.match_labels):
        return False
    for r in s.match_expressions:
        ok = {"In": r.key in labels and labels[r.key] in r.values,
              "NotIn": not (r.key in labels and labels[r.key] in r.values),
              "Exists": r.key in labels,
              "DoesNotExist": r.key not in labels}[r.operator]
        if not ok:
            return False
    return True


@given(pods=st.lists(st.tuples(st.sampled_from(["x", "y"]), labels_st), max_size=8),
       ns_labels=st.tuples(labels_st, labels_st),
       pod_sel=st.one_of(st.none(), selector_st), ns_sel=st.one_of(st.none(), selector_st))
def test_selection_matches_reference(pods, ns_labels, pod_sel, ns_sel):
    namespaces = [Namespace("x", tuple(sorted(ns_labels[0].items()))), Namespace("y", tuple(sorted(ns_labels[1].items())))]
    recs = [pod(ns, f"p{i}", f"10.0.0.{i + 1}", labels=labels) for i, (ns, labels) in enumerate(pods)]
    c = cluster_of(*namespaces, *recs)
    peer = PolicyPeer(pod_selector=pod_sel, namespace_selector=ns_sel)
    s = PeerSelector.of_peer(peer, "x")
    if s is None:
        assert pod_sel is None and ns_sel is None
        return
    ns_lab = {"x": {**ns_labels[0], "kubernetes.io/metadata.name": "x"},
              "y": {**ns_labels[1], "kubernetes.io/metadata.name": "y"}}
    expected = set()
    for i, (ns, labels) in enumerate(pods):
        in_scope = ns == "x" if ns_sel is None else reference_match(ns_sel, ns_lab[ns])
        if in_scope and reference_match(pod_sel or LabelSelector(), labels):
            expected.add(f"10.0.0.{i + 1}")
    assert SelectorIndex(c.endpoints(), c.namespaces).members(s) == expected


@settings(max_examples=400)
@given(st.one_of(st.ip_addresses().map(str), st.text(alphabet="0123456789.:/ abcdef", max_size=20),
                 st.lists(st.integers(0, 300).map(str), min_size=3, max_size=5).map(".".join)))
def test_ipv4_addresses_keeps_exactly_what_ipaddress_calls_ipv4(text):
    try:
        want = ipaddress.ip_address(text).version == 4
    except ValueError:
        want = False
    assert ipv4_addresses([text]) == ([text] if want else [])
