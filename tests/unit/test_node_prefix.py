"""Kubernetes mode: a Node's InternalIP has no prefix, so the node takes its own subnet from
its uplink (calc.routes.with_own_prefix) and judges peers by whether their InternalIP lies
in it.  Found against a real kube-apiserver: as a /32 every peer was "another subnet", so
bgp's kernel export accepted no route, direct installed none and crossSubnet always
encapsulated."""
from felix_agent.calc.bird_conf import bird_config
from felix_agent.calc.desired import Route
from felix_agent.calc.routes import remote_routes, unreachable_direct_nodes, with_own_prefix
from felix_agent.datastore.convert import from_k8s, to_k8s
from felix_agent.model import IPPool


def k8s_node(name, ip, cidr, ann=None):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": ann or {}},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                     {"type": "Hostname", "address": name}]}}


def cluster(ann_a=None):
    nodes = [from_k8s(k8s_node("a", "10.99.0.11", "10.244.1.0/24", ann_a)),
             from_k8s(k8s_node("b", "10.99.0.12", "10.244.2.0/24")),
             from_k8s(k8s_node("c", "10.98.0.13", "10.244.3.0/24"))]  # behind a router
    return {n.name: n for n in nodes}


def test_internal_ip_is_marked_and_round_trips():
    n = cluster()["a"]
    assert n.ip == "10.99.0.11/32" and n.ip_from_status
    assert from_k8s(to_k8s(n)) == n
    ann = cluster({"tortie.io/ipv4-address": "10.99.0.11/16"})["a"]
    assert ann.ip == "10.99.0.11/16" and not ann.ip_from_status


def test_own_prefix_from_the_uplink():
    nodes = with_own_prefix(cluster(), "a", "10.99.0.11/24")
    assert nodes["a"].ip == "10.99.0.11/24"
    assert nodes["b"].ip == "10.99.0.12/32"  # peers keep theirs: only membership matters
    # an annotation wins; an uplink subnet that does not hold the InternalIP is not applied
    assert with_own_prefix(cluster({"tortie.io/ipv4-address": "10.99.0.11/28"}), "a",
                           "10.99.0.11/24")["a"].ip == "10.99.0.11/28"
    assert with_own_prefix(cluster(), "a", "172.16.0.5/24")["a"].ip == "10.99.0.11/32"
    assert with_own_prefix(cluster(), "a", "")["a"].ip == "10.99.0.11/32"
    assert with_own_prefix(cluster(), "nobody", "10.99.0.11/24") == cluster()


def test_direct_routes_to_peers_on_the_uplink_subnet():
    pools = [IPPool("p", "10.244.0.0/16", mode="direct")]
    before = remote_routes(cluster(), pools, [], "a")
    assert before == frozenset()  # the bug: every peer looked off-subnet
    nodes = with_own_prefix(cluster(), "a", "10.99.0.11/24")
    assert remote_routes(nodes, pools, [], "a") == {
        Route("10.244.2.0/24", dev="eth0", gateway="10.99.0.12", onlink=True)}
    assert unreachable_direct_nodes(nodes, pools, [], "a") == ("c",)


def test_cross_subnet_vxlan_encapsulates_only_across_the_router():
    pools = [IPPool("p", "10.244.0.0/16", mode="vxlan", cross_subnet=True)]
    nodes = with_own_prefix(cluster(), "a", "10.99.0.11/24")
    got = remote_routes(nodes, pools, [], "a")
    plain = {r for r in got if r.dev == "eth0"}
    assert plain == {Route("10.244.2.0/24", dev="eth0", gateway="10.99.0.12")}


def test_bgp_kernel_export_accepts_next_hops_on_the_subnet():
    pools = [IPPool("p", "10.244.0.0/16", mode="bgp")]
    conf = bird_config(with_own_prefix(cluster(), "a", "10.99.0.11/24"), [], pools, [], "a")
    assert "10.99.0.0/24" in conf and "10.99.0.11/32" not in conf
    assert "10.99.0.11/32" in bird_config(cluster(), [], pools, [], "a")  # the bug it fixes
