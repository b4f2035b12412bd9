"""felix_agent.datastore.convert against every recorded kube-apiserver v1.28 object, plus tortie's
own kinds, the API's NetworkPolicy validation and the to_k8s round trip."""
import copy
import glob
import json
import os

import pytest

from felix_agent import model
from felix_agent.datastore.convert import ConvertError, from_k8s, key_from_k8s, kind_of, to_k8s

from tests.fakes.apiserver import DATA_DIR as DATA  # tests/fixtures/k8s-api


def _load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def _items(name):
    d = _load(name)
    return [from_k8s(i, d["kind"][: -len("List")]) for i in d["items"]]


def _policies():
    return {p.name: p for p in _items("networkpolicies.json")}


def _watch_objects(name):
    with open(os.path.join(DATA, name)) as f:
        return [json.loads(line) for line in f]


# --- every recorded object converts and round-trips ----------------------------------------

LIST_FILES = sorted(os.path.basename(p) for p in glob.glob(f"{DATA}/*.json")
                    if _load(os.path.basename(p)).get("kind", "").endswith("List"))


def test_all_list_files_found():
    assert set(LIST_FILES) == {"namespaces.json", "nodes.json", "pods.json", "networkpolicies.json",
                               "pods-page1.json", "pods-page2.json", "pods-page3.json"}


@pytest.mark.parametrize("name", LIST_FILES)
def test_every_listed_object_converts_and_round_trips(name):
    d = _load(name)
    kind = d["kind"][: -len("List")]
    for item in d["items"]:
        rec = from_k8s(item, kind)
        assert kind_of(rec) == kind
        assert rec.key == key_from_k8s(item, kind)
        assert from_k8s(to_k8s(rec)) == rec
        assert from_k8s(json.loads(json.dumps(to_k8s(rec)))) == rec


@pytest.mark.parametrize("name", ["pods-watch.ndjson", "namespaces-watch.ndjson",
                                  "networkpolicies-watch.ndjson", "nodes-watch.ndjson"])
def test_every_watched_object_converts(name):
    n = 0
    for ev in _watch_objects(name):
        if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
            rec = from_k8s(ev["object"])
            assert rec.key == key_from_k8s(ev["object"])
            assert from_k8s(to_k8s(rec)) == rec
            n += 1
    assert n > 0


def test_list_item_without_kind_needs_kind():
    item = _load("namespaces.json")["items"][0]
    with pytest.raises(ConvertError, match="no kind"):
        from_k8s(item)


# --- the eleven recorded policies --------------------------------------------------------

def test_eleven_policies_all_in_x():
    pols = _policies()
    assert len(pols) == 11
    assert {p.namespace for p in pols.values()} == {"x"}


def test_default_deny_policies():
    pols = _policies()
    for name, types in (("default-deny-ingress", ("Ingress",)), ("default-deny-egress", ("Egress",))):
        p = pols[name]
        assert p.pod_selector.is_empty and p.policy_types == types
        assert p.ingress == () and p.egress == ()


def test_and_peer_vs_or_peers():
    pols = _policies()
    and_rule = pols["allow-ns-y-and-pod-b"].ingress[0]
    assert len(and_rule.peers) == 1
    peer = and_rule.peers[0]
    assert peer.pod_selector.match_labels == (("pod", "b"),)
    assert peer.namespace_selector.match_labels == (("ns", "y"),)
    assert and_rule.ports == (model.PolicyPort("TCP", 80),)
    or_rule = pols["allow-ns-y-or-pod-b"].ingress[0]
    assert len(or_rule.peers) == 2
    assert or_rule.peers[0].pod_selector is None
    assert or_rule.peers[0].namespace_selector.match_labels == (("ns", "y"),)
    assert or_rule.peers[1].namespace_selector is None
    assert or_rule.ports == ()


def test_match_expressions():
    p = _policies()["match-expressions"]
    assert p.pod_selector.match_expressions == (model.SelectorRequirement("pod", "In", ("a", "b")),)
    assert p.pod_selector.matches({"pod": "a"}) and not p.pod_selector.matches({"pod": "c"})
    peer = p.ingress[0].peers[0]
    assert [r.operator for r in peer.pod_selector.match_expressions] == ["Exists", "DoesNotExist"]
    assert [r.operator for r in peer.namespace_selector.match_expressions] == ["NotIn", "Exists"]
    eg = p.egress[0].peers[0].pod_selector
    assert eg.match_labels == (("pod", "c"),)
    assert eg.match_expressions == (model.SelectorRequirement("tier", "DoesNotExist"),)
    assert p.policy_types == ("Ingress", "Egress")


def test_ipblock_except():
    p = _policies()["ipblock-except"]
    v4, v6 = p.ingress[0].peers
    assert v4.ip_block == model.IPBlock("10.244.0.0/16", ("10.244.9.0/28", "10.244.9.128/25"))
    assert v6.ip_block == model.IPBlock("2001:db8::/32", ("2001:db8:1::/48",))
    assert v4.pod_selector is None and v4.namespace_selector is None
    eg = p.egress[0]
    assert eg.peers[0].ip_block == model.IPBlock("0.0.0.0/0", ("10.244.9.5/32",))
    assert eg.ports == (model.PolicyPort("TCP", 443),)


def test_ports_and_protocols():
    p = _policies()["ports-and-protocols"]
    r0, r1 = p.ingress
    assert r0.ports == (
        model.PolicyPort("TCP", 80), model.PolicyPort("TCP", "serve-81-tcp"),
        model.PolicyPort("UDP", "serve-80-udp"), model.PolicyPort("UDP", 80),
        model.PolicyPort("SCTP", 80), model.PolicyPort("TCP", 8000, 8080),
        model.PolicyPort("TCP", 9090))
    assert r0.peers == (model.PolicyPeer(pod_selector=model.LabelSelector()),)
    assert r1.peers == () and r1.ports == (model.PolicyPort("SCTP", "serve-80-sctp"),)


def test_policy_types_as_recorded_and_allow_all():
    pols = _policies()
    assert pols["policytypes-omitted-ingress"].policy_types == ("Ingress",)
    assert pols["policytypes-omitted-egress"].policy_types == ("Ingress", "Egress")
    assert pols["policytypes-omitted-egress"].egress[0].peers[0].namespace_selector.is_empty
    assert pols["allow-dns-egress"].policy_types == ("Egress",)
    assert pols["allow-dns-egress"].egress[0].ports == (model.PolicyPort("UDP", 53),
                                                        model.PolicyPort("TCP", 53))
    allow_all = pols["allow-all-ingress"]
    assert allow_all.ingress == (model.PolicyRule(),)


def _np(spec, **meta):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x", **meta}, "spec": spec}


def test_policy_types_defaulting_like_the_api_server():
    assert from_k8s(_np({"podSelector": {}})).policy_types == ("Ingress",)
    assert from_k8s(_np({"podSelector": {}, "ingress": [{}]})).policy_types == ("Ingress",)
    assert from_k8s(_np({"podSelector": {}, "egress": [{}]})).policy_types == ("Ingress", "Egress")
    # As in the API server's defaulting, an empty egress list adds no Egress type.
    assert from_k8s(_np({"podSelector": {}, "egress": []})).policy_types == ("Ingress",)
    assert from_k8s(_np({"podSelector": {}, "policyTypes": ["Egress", "Ingress"]})).policy_types \
        == ("Ingress", "Egress")


def test_missing_namespace_is_default():
    obj = _np({"podSelector": {}})
    del obj["metadata"]["namespace"]
    assert from_k8s(obj).namespace == "default"


BAD_POLICIES = [
    ({"podSelector": {}, "ingres": []}, "spec.ingres", "unknown field 'ingres'"),
    ({"podSelector": {}, "ingress": [{"form": []}]}, "spec.ingress[0].form", "unknown field"),
    ({"podSelector": {"matchLabel": {}}}, "spec.podSelector.matchLabel", "unknown field"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
     "spec.ingress[0].ports[0].protocol", "'ICMP' is not one of TCP, UDP, SCTP"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]},
     "spec.ingress[0].ports[0].port", "not a valid port number"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 65536}]}]},
     "spec.ingress[0].ports[0].port", "not a valid port number"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "HTTP"}]}]},
     "spec.ingress[0].ports[0].port", "not a valid port name"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "a-very-long-port-name"}]}]},
     "spec.ingress[0].ports[0].port", "not a valid port name"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "8080"}]}]},
     "spec.ingress[0].ports[0].port", "not a valid port name"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "web--x"}]}]},
     "spec.ingress[0].ports[0].port", "not a valid port name"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort", "only be set with a numeric port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort", "only be set with a numeric port"),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 100, "endPort": 90}]}]},
     "spec.egress[0].ports[0].endPort", "must be >= port 100"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr", "not a valid CIDR"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                             "except": ["11.0.0.0/16"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                             "except": ["10.0.0.0/8"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                             "except": ["2001:db8::/64"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"},
                                               "podSelector": {}}]}]},
     "spec.egress[0].to[0]", "may not set ipBlock together"),
    ({"podSelector": {}, "egress": [{"to": [{}]}]}, "spec.egress[0].to[0]", "must specify a peer"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values", "non-empty when operator is In"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]}},
     "spec.podSelector.matchExpressions[0].values", "non-empty when operator is NotIn"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].values", "empty when operator is Exists"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "DoesNotExist",
                                            "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].values", "empty when operator is DoesNotExist"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].operator", "'Equals' is not one of"),
    ({"podSelector": {"matchLabels": {"bad key!": "x"}}}, "spec.podSelector.matchLabels",
     "invalid label key"),
    ({"podSelector": {}, "policyTypes": ["ingress"]}, "spec.policyTypes[0]", "not one of Ingress, Egress"),
    ({"podSelector": {}, "policyTypes": ["Ingress", "Ingress"]}, "spec.policyTypes", "duplicate"),
    ({"podSelector": {}, "ingress": {"from": []}}, "spec.ingress", "must be a list"),
]


@pytest.mark.parametrize("spec,path,msg", BAD_POLICIES)
def test_bad_policy_names_object_and_field(spec, path, msg):
    with pytest.raises(ConvertError) as e:
        from_k8s(_np(spec))
    text = str(e.value)
    assert text.startswith("NetworkPolicy x/p: "), text
    assert f": {path}: " in text, text
    assert msg in text, text


def test_unknown_top_level_field_and_wrong_api_version():
    obj = _np({"podSelector": {}})
    obj["sepc"] = {}
    with pytest.raises(ConvertError, match="unknown field 'sepc'"):
        from_k8s(obj)
    obj = _np({"podSelector": {}})
    obj["apiVersion"] = "extensions/v1beta1"
    with pytest.raises(ConvertError, match="apiVersion"):
        from_k8s(obj)


def test_valid_edge_ports():
    p = from_k8s(_np({"podSelector": {}, "ingress": [{"ports": [
        {"port": 1}, {"port": 65535}, {"port": 10, "endPort": 10}, {"port": "dns-tcp"}]}]}))
    assert [x.port for x in p.ingress[0].ports] == [1, 65535, 10, "dns-tcp"]
    assert p.ingress[0].ports[2].end_port == 10


# --- pods --------------------------------------------------------------------------------

def _pods():
    return {p.key: p for p in _items("pods.json")}


def test_pod_fields_from_recorded_list():
    a = _pods()["x/a"]
    assert a.labels == (("pod", "a"),)
    assert a.node == "vm" and a.ips == ("10.244.9.3",)
    assert a.uid == "9f244ca8-1b6f-4394-84d2-1045e1eb006c"
    assert not a.host_network
    assert model.NamedPort("serve-80-sctp", 80, "SCTP") in a.ports
    assert {(p.name, p.port, p.protocol) for p in a.ports} == {
        ("serve-80-tcp", 80, "TCP"), ("serve-81-tcp", 81, "TCP"),
        ("serve-80-udp", 80, "UDP"), ("serve-80-sctp", 80, "SCTP")}
    # kubectl's last-applied copy is left out; nothing else was annotated.
    assert a.annotations == ()


def test_pages_hold_the_same_pods_as_the_full_list():
    paged = _items("pods-page1.json") + _items("pods-page2.json") + _items("pods-page3.json")
    assert sorted(paged, key=lambda p: p.key) == sorted(_pods().values(), key=lambda p: p.key)


def test_pod_lifecycle_in_watch_stream():
    evs = [(e["type"], from_k8s(e["object"])) for e in _watch_objects("pods-watch.ndjson")
           if e["type"] != "BOOKMARK"]
    pending = evs[0][1]
    assert evs[0][0] == "ADDED" and pending.node == "" and pending.ips == ()
    running = [p for _, p in evs if p.ips]
    assert running and all(p.ips == ("10.244.9.11",) for p in running)
    assert [p.labels for _, p in evs][4] == (("pod", "e"),)
    # The Failed pod (exit 137) keeps podIPs in the API but has none for policy.
    failed = [e["object"] for e in _watch_objects("pods-watch.ndjson")
              if e["object"].get("status", {}).get("phase") == "Failed"]
    assert any(o["status"].get("podIPs") for o in failed)
    assert all(from_k8s(o).ips == () for o in failed)


def test_pod_dual_stack_podip_fallback_and_host_network():
    obj = {"kind": "Pod", "metadata": {"name": "p", "namespace": "n", "annotations": {"k": "v"}},
           "spec": {"hostNetwork": True, "containers": [{"name": "c", "ports": [
               {"containerPort": 53, "protocol": "UDP"}, {"name": "dns", "containerPort": 53,
                                                          "protocol": "UDP"}]}]},
           "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}}
    p = from_k8s(obj)
    assert p.ips == ("10.0.0.1", "fd00::1") and p.host_network
    assert p.ports == (model.NamedPort("dns", 53, "UDP"),)  # unnamed ports are not kept
    assert p.annotations == (("k", "v"),)
    obj["status"] = {"phase": "Running", "podIP": "10.0.0.2"}
    assert from_k8s(obj).ips == ("10.0.0.2",)
    assert not from_k8s(obj).finished
    obj["status"] = {"phase": "Succeeded", "podIP": "10.0.0.2"}
    assert from_k8s(obj).ips == () and from_k8s(obj).finished
    obj["status"] = {"phase": "Failed"}
    assert from_k8s(obj).finished
    obj["status"] = {"podIP": "10.0.0.300"}
    with pytest.raises(ConvertError, match=r"Pod n/p: status.podIP: '10.0.0.300'"):
        from_k8s(obj)


# --- namespaces and nodes ----------------------------------------------------------------

def test_namespaces():
    ns = {n.name: n for n in _items("namespaces.json")}
    assert set(ns) == {"default", "kube-node-lease", "kube-public", "kube-system", "x", "y", "z"}
    assert dict(ns["y"].labels) == {"kubernetes.io/metadata.name": "y", "ns": "y", "team": "b"}


def test_node_from_recorded_list_falls_back_to_internal_ip():
    (vm,) = _items("nodes.json")
    assert vm.name == "vm" and vm.ip == "192.0.2.2/32" and vm.address == "192.0.2.2"
    assert vm.pod_cidrs == ("10.244.0.0/24",)
    assert ("kubernetes.io/hostname", "vm") in vm.labels
    assert vm.as_number is None and vm.route_reflector_cluster_id == ""


def test_node_b_gets_pod_cidr_in_watch():
    nodes = [from_k8s(e["object"]) for e in _watch_objects("nodes-watch.ndjson")
             if e["type"] != "BOOKMARK"]
    assert nodes[0].pod_cidrs == () and nodes[0].ip == "192.0.2.10/32"
    assert nodes[1].pod_cidrs == ("10.244.1.0/24",)


def _node(ann=None, labels=None, **extra):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "annotations": ann or {}, "labels": labels or {}},
            "spec": {"podCIDR": "10.65.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.7"},
                                     {"type": "InternalIP", "address": "fd00::7"}]}, **extra}


def test_node_annotations():
    n = from_k8s(_node({
        "tortie.io/ipv4-address": "192.168.100.11/24", "tortie.io/ipv6-address": "fd00::11/64",
        "tortie.io/as-number": "64513", "tortie.io/vxlan-tunnel-addr": "10.65.0.0",
        "tortie.io/vxlan-tunnel-mac": "66:AA:bb:cc:dd:ee", "tortie.io/ipip-tunnel-addr": "10.65.0.1",
        "tortie.io/route-reflector-cluster-id": "224.0.0.1"}))
    assert n == model.Node(name="n1", ip="192.168.100.11/24", ip6="fd00::11/64", as_number=64513,
                           pod_cidrs=("10.65.0.0/24",), vxlan_tunnel_addr="10.65.0.0",
                           vxlan_tunnel_mac="66:aa:bb:cc:dd:ee", ipip_tunnel_addr="10.65.0.1",
                           route_reflector_cluster_id="224.0.0.1")
    assert from_k8s(to_k8s(n)) == n
    plain = from_k8s(_node())
    assert plain.ip == "192.0.2.7/32" and plain.ip6 == "fd00::7/128"
    assert plain.pod_cidrs == ("10.65.0.0/24",)  # spec.podCIDR alone
    rr = from_k8s(_node(labels={"tortie.io/route-reflector-cluster-id": "1.0.0.1"}))
    assert rr.route_reflector_cluster_id == "1.0.0.1"


@pytest.mark.parametrize("ann,field", [
    ({"tortie.io/ipv4-address": "fd00::1/64"}, "tortie.io/ipv4-address"),
    ({"tortie.io/ipv4-address": "192.168.1.300/24"}, "tortie.io/ipv4-address"),
    ({"tortie.io/as-number": "sixty"}, "tortie.io/as-number"),
    ({"tortie.io/as-number": "0"}, "tortie.io/as-number"),
    ({"tortie.io/vxlan-tunnel-mac": "66:aa"}, "tortie.io/vxlan-tunnel-mac"),
    ({"tortie.io/route-reflector-cluster-id": "cluster-a"}, "tortie.io/route-reflector-cluster-id"),
])
def test_bad_node_annotations(ann, field):
    with pytest.raises(ConvertError, match=rf"^Node n1: metadata.annotations\[{field}\]"):
        from_k8s(_node(ann))


# --- tortie's own kinds ------------------------------------------------------------------

def _own(kind, name, spec):
    return {"apiVersion": "tortie.io/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_ip_pool_defaults_and_fields():
    p = from_k8s(_own("IPPool", "default", {"cidr": "10.65.0.0/16"}))
    assert p == model.IPPool(name="default", cidr="10.65.0.0/16", block_size=26, mode="bgp")
    q = from_k8s(_own("IPPool", "vx", {"cidr": "10.66.0.0/16", "blockSize": 28, "mode": "vxlan",
                                       "crossSubnet": True, "natOutgoing": True, "disabled": True}))
    assert q == model.IPPool("vx", "10.66.0.0/16", 28, "vxlan", True, True, True)
    assert from_k8s(to_k8s(q)) == q


def test_ipv6_pool_defaults_to_122_blocks_as_calico():
    p = from_k8s(_own("IPPool", "v6", {"cidr": "fd00:10:65::/112", "natOutgoing": True}))
    assert p == model.IPPool(name="v6", cidr="fd00:10:65::/112", block_size=122, mode="bgp", nat_outgoing=True)
    assert from_k8s(to_k8s(p)) == p
    vx = from_k8s(_own("IPPool", "v6x", {"cidr": "fd00:10:66::/64", "mode": "vxlan", "blockSize": 120}))
    assert (vx.block_size, vx.mode) == (120, "vxlan")


@pytest.mark.parametrize("spec,path,msg", [
    ({"cidr": "fd00:10:65::/112", "mode": "ipip"}, "spec.mode", "ipip carries IPv4 only"),
    ({"cidr": "fd00:10:65::/112", "blockSize": 129}, "spec.blockSize", "out of range"),
    ({"cidr": "fd00:10:65::/112", "blockSize": 100}, "spec.blockSize", "shorter than the pool"),
    ({"cidr": "fd00:10:65::1/112"}, "spec.cidr", "host bits"),
    ({"cidr": "10.65.0.0/16", "mode": "gre"}, "spec.mode", "'gre' is not one of"),
    ({"cidr": "10.65.0.1/16"}, "spec.cidr", "host bits"),
    ({"cidr": "banana"}, "spec.cidr", "not a valid CIDR"),
    ({}, "spec.cidr", "is required"),
    ({"cidr": "10.65.0.0/16", "blockSize": 8}, "spec.blockSize", "shorter than the pool"),
    ({"cidr": "10.65.0.0/16", "blockSize": 33}, "spec.blockSize", "out of range"),
    ({"cidr": "10.65.0.0/16", "natOutgoing": "yes"}, "spec.natOutgoing", "true or false"),
    ({"cidr": "10.65.0.0/16", "crossSubnet": True}, "spec.crossSubnet", "vxlan or ipip"),
    ({"cidr": "10.65.0.0/16", "blocksize": 26}, "spec.blocksize", "unknown field 'blocksize'"),
])
def test_bad_ip_pool(spec, path, msg):
    with pytest.raises(ConvertError) as e:
        from_k8s(_own("IPPool", "p1", spec))
    assert str(e.value).startswith(f"IPPool p1: {path}: ") and msg in str(e.value), str(e.value)


def test_bgp_peer():
    p = from_k8s(_own("BGPPeer", "tor", {"peerIP": "192.168.100.1", "asNumber": 65000}))
    assert p == model.BGPPeer("tor", "192.168.100.1", 65000, "")
    assert from_k8s(to_k8s(p)) == p
    n = from_k8s(_own("BGPPeer", "tor2", {"peerIP": "192.168.100.1", "asNumber": 65000, "node": "n1"}))
    assert n.node == "n1" and from_k8s(to_k8s(n)) == n
    with pytest.raises(ConvertError, match=r"BGPPeer tor: spec.asNumber"):
        from_k8s(_own("BGPPeer", "tor", {"peerIP": "192.168.100.1", "asNumber": "65000"}))
    with pytest.raises(ConvertError, match=r"BGPPeer tor: spec.peerIP"):
        from_k8s(_own("BGPPeer", "tor", {"peerIP": "192.168.100.0/24", "asNumber": 65000}))


def test_bgp_peer_password_is_a_node_local_file():
    spec = {"peerIP": "192.168.100.1", "asNumber": 65000, "passwordFile": "/etc/tortie/tor.pw"}
    p = from_k8s(_own("BGPPeer", "tor", spec))
    assert p.password_file == "/etc/tortie/tor.pw" and from_k8s(to_k8s(p)) == p
    with pytest.raises(ConvertError, match=r"BGPPeer tor: spec.passwordFile: must be an absolute path"):
        from_k8s(_own("BGPPeer", "tor", {**spec, "passwordFile": "tor.pw"}))
    secret_ref = {"secretKeyRef": {"name": "bgp", "key": "tor"}}
    with pytest.raises(ConvertError, match=r"BGPPeer tor: spec.password: is not supported.*passwordFile"):
        from_k8s(_own("BGPPeer", "tor", {"peerIP": "192.168.100.1", "asNumber": 65000, "password": secret_ref}))


def test_workload_endpoint():
    spec = {"node": "node-1.lab", "namespace": "x", "pod": "a", "containerID": "abc",
            "iface": "cali0123456789a", "ips": ["10.65.1.2/32", "fd00::2"], "mac": "EE:EE:EE:EE:EE:EE"}
    w = from_k8s(_own("WorkloadEndpoint", "node-1.lab.x.a", spec))
    assert w == model.WorkloadEndpoint(namespace="x", pod="a", node="node-1.lab", container_id="abc",
                                       iface="cali0123456789a", ips=("10.65.1.2", "fd00::2"),
                                       mac="ee:ee:ee:ee:ee:ee")
    assert w.key == "node-1.lab/x/a"
    assert to_k8s(w)["metadata"]["name"] == "node-1.lab.x.a"
    assert from_k8s(to_k8s(w)) == w
    assert key_from_k8s(to_k8s(w)) == w.key
    with pytest.raises(ConvertError, match=r"metadata.name: 'n.x.b' must be 'node-1.lab.x.a'"):
        from_k8s(_own("WorkloadEndpoint", "n.x.b", spec))
    with pytest.raises(ConvertError, match=r"spec.ips\[0\]"):
        from_k8s(_own("WorkloadEndpoint", "", {**spec, "ips": ["10.65.1.0/24"]}))


def test_block_affinity():
    b = from_k8s(_own("BlockAffinity", "10.65.1.0-26", {"cidr": "10.65.1.0/26", "node": "n1",
                                                         "pool": "default"}))
    assert b == model.BlockAffinity("10.65.1.0/26", "n1", "default") and b.key == "10.65.1.0/26"
    assert to_k8s(b)["metadata"]["name"] == "10.65.1.0-26"
    assert from_k8s(to_k8s(b)) == b
    assert key_from_k8s({"kind": "BlockAffinity", "metadata": {"name": "10.65.1.0-26"}}) == "10.65.1.0/26"
    with pytest.raises(ConvertError, match="must be '10.65.1.0-26'"):
        from_k8s(_own("BlockAffinity", "10.65.2.0-26", {"cidr": "10.65.1.0/26", "node": "n1"}))
    with pytest.raises(ConvertError, match="spec.node: is required"):
        from_k8s(_own("BlockAffinity", "", {"cidr": "10.65.1.0/26"}))


def test_unknown_kind_and_non_mapping():
    with pytest.raises(ConvertError, match="'Service' is not one of"):
        from_k8s({"kind": "Service", "metadata": {"name": "s"}})
    with pytest.raises(ConvertError, match="mapping"):
        from_k8s(["not", "a", "dict"])
    with pytest.raises(ConvertError, match=r"Namespace <unnamed>: metadata.name: is required"):
        from_k8s({"kind": "Namespace", "metadata": {}})


def test_conversion_does_not_mutate_input():
    d = _load("networkpolicies.json")
    before = copy.deepcopy(d)
    for i in d["items"]:
        from_k8s(i, "NetworkPolicy")
    assert d == before


def test_node_ipv6_vtep_annotations_round_trip_and_are_checked():
    n = model.Node("n1", "192.168.100.11/24", ip6="fd00:100::11/64", vxlan_tunnel_addr6="fd00:10:65::40",
                   vxlan_tunnel_mac6="66:11:22:33:44:57")
    assert from_k8s(to_k8s(n)) == n
    bad = to_k8s(n)
    bad["metadata"]["annotations"]["tortie.io/vxlan-tunnel-addr-v6"] = "10.65.0.1"
    with pytest.raises(ConvertError, match="is not IPv6"):
        from_k8s(bad)
