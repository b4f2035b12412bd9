"""The whole node stack in the lab: etcd, agents with BIRD, pods wired by the real CNI
binary through the agent, and a policy taking effect."""
import pytest

from tests.lab.cluster import wait_for

pytestmark = pytest.mark.root


def test_pods_on_two_nodes_talk_then_policy_denies(make_cluster):
    c = make_cluster(2)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"}, serve=["tcp:80"])
    b = c.add_pod("default", "b", "node2", labels={"app": "b"}, serve=["tcp:80"])
    assert a.iface.startswith("cali") and a.ip != b.ip
    wait_for(lambda: "proto bird" in c.routes("node1"), what="a BGP route on node1")
    assert c.ping(a, b.ip) and c.ping(b, a.ip)
    assert c.probe(a, b.ip, 80) and c.probe(b, a.ip, 80)
    c.apply("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: c}}}]}]
""")
    wait_for(lambda: not c.probe(a, b.ip, 80, timeout=0.5), what="the policy to deny a -> b")
    assert c.probe(b, a.ip, 80)  # a has no policy
    st = c.status("node2")
    assert st["in_sync"] and [e["pod"] for e in st["endpoints"]] == ["b"]
    # a pod created after the policy is protected from its first packet
    c3 = c.add_pod("default", "c", "node1", labels={"app": "c"})
    # c's ADD returns once node1 has programmed c; node2 admits it once its own pass has put
    # c's address in the ipset of b's policy (a few ms later, through etcd).
    wait_for(lambda: c.probe(c3, b.ip, 80), timeout=10, what="node2 to admit the new pod c")
    late = c.add_pod("default", "late", "node1", labels={"app": "late"})
    assert not c.probe(late, b.ip, 80, timeout=0.5)
