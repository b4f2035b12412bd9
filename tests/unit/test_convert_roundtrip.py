"""Property: for every valid record, from_k8s(to_k8s(r)) == r (the etcd backend stores
to_k8s and reads with from_k8s, so nothing may be lost or changed on the way)."""
from hypothesis import given, settings, strategies as st

from felix_agent import model
from felix_agent.datastore.convert import from_k8s, to_k8s

label_part = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
labels = st.dictionaries(label_part, label_part, max_size=3).map(model.labels_of)
selector = st.builds(
    model.LabelSelector, match_labels=labels,
    match_expressions=st.lists(st.one_of(
        st.builds(model.SelectorRequirement, key=label_part, operator=st.sampled_from(["In", "NotIn"]),
                  values=st.lists(label_part, min_size=1, max_size=3).map(tuple)),
        st.builds(model.SelectorRequirement, key=label_part,
                  operator=st.sampled_from(["Exists", "DoesNotExist"]))), max_size=2).map(tuple))
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
port = st.one_of(st.none(), st.integers(1, 65535), st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True))


@st.composite
def policy_port(draw):
    p = draw(port)
    end = draw(st.integers(p, 65535)) if isinstance(p, int) and draw(st.booleans()) else None
    return model.PolicyPort(draw(st.sampled_from(["TCP", "UDP", "SCTP"])), p, end)


peer = st.one_of(
    st.builds(model.PolicyPeer, pod_selector=selector, namespace_selector=st.one_of(st.none(), selector)),
    st.builds(model.PolicyPeer, namespace_selector=selector),
    st.builds(model.PolicyPeer, ip_block=st.just(model.IPBlock("10.0.0.0/8", ("10.1.0.0/16",)))),
)
rule = st.builds(model.PolicyRule, peers=st.lists(peer, max_size=2).map(tuple),
                 ports=st.lists(policy_port(), max_size=3).map(tuple))


@st.composite
def network_policy(draw):
    ingress = tuple(draw(st.lists(rule, max_size=2)))
    egress = tuple(draw(st.lists(rule, max_size=2)))
    types = draw(st.sampled_from([("Ingress",), ("Egress",), ("Ingress", "Egress")]))
    return model.NetworkPolicy(draw(label_part), draw(label_part), draw(selector), ingress, egress, types)


tier_peer = st.one_of(
    st.builds(model.TierPeer, namespaces=selector),
    st.builds(lambda n, p: model.TierPeer(pods=model.NamespacedPods(n, p)), selector, selector))
tier_port = st.one_of(
    st.builds(model.TierPort, protocol=st.sampled_from(["TCP", "UDP", "SCTP"]), port=st.integers(1, 65534)),
    st.integers(1, 65534).map(lambda p: model.TierPort("UDP", p, p + 1)),
    label_part.map(lambda n: model.TierPort(None, name=n)))


def tier_rules(actions: list[str], egress: bool):
    peers = st.one_of(tier_peer, st.just(model.TierPeer(networks=("10.0.0.0/8", "fd00::/8"))),
                      st.builds(model.TierPeer, nodes=selector)) if egress else tier_peer
    plain = st.builds(model.TierRule, action=st.sampled_from(actions), peers=st.lists(tier_peer, min_size=1,
                      max_size=2).map(tuple), ports=st.lists(tier_port, max_size=2).map(tuple), name=label_part)
    nets = st.builds(model.TierRule, action=st.sampled_from(actions), peers=st.lists(peers, min_size=1,
                     max_size=2).map(tuple), ports=st.lists(tier_port.filter(lambda p: not p.name), max_size=2).map(tuple))
    return st.lists(st.one_of(plain, nets), max_size=2).map(tuple)


@st.composite
def cluster_policy(draw):
    cls = draw(st.sampled_from([model.ClusterNetworkPolicy, model.AdminNetworkPolicy,
                                model.BaselineAdminNetworkPolicy]))
    tier = {model.AdminNetworkPolicy: "Admin", model.BaselineAdminNetworkPolicy: "Baseline"}.get(
        cls, draw(st.sampled_from(["Admin", "Baseline"])))
    banp = cls is model.BaselineAdminNetworkPolicy
    actions = ["Accept", "Deny"] + ([] if banp else ["Pass"])
    return cls("default" if banp else draw(label_part), tier,
               model.BANP_PRIORITY if banp else draw(st.integers(0, 1000)), draw(tier_peer),
               draw(tier_rules(actions, False)), draw(tier_rules(actions, True)))


records = st.one_of(
    network_policy(),
    cluster_policy(),
    st.builds(model.Namespace, name=label_part, labels=labels),
    st.builds(model.Pod, namespace=label_part, name=label_part, labels=labels, node=label_part,
              ips=st.lists(ipv4, max_size=2).map(tuple),
              ports=st.lists(st.builds(model.NamedPort, name=label_part, port=st.integers(1, 65535),
                                       protocol=st.sampled_from(["TCP", "UDP", "SCTP"])), max_size=2).map(tuple),
              annotations=labels, host_network=st.booleans(), uid=label_part),
    st.builds(model.Node, name=label_part, ip=ipv4.map(lambda a: a + "/24"),
              as_number=st.one_of(st.none(), st.integers(1, 4294967295)),
              pod_cidrs=st.just(("10.65.0.0/24",)), labels=labels),
    st.builds(model.BGPPeer, name=label_part, peer_ip=ipv4, as_number=st.integers(1, 65535), node=label_part),
    st.builds(model.IPPool, name=label_part, cidr=st.just("10.65.0.0/16"), block_size=st.integers(16, 32),
              mode=st.sampled_from(["bgp", "direct"]), nat_outgoing=st.booleans(), disabled=st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(records)
def test_round_trip(rec):
    assert from_k8s(to_k8s(rec)) == rec
