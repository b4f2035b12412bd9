"""The whole node stack in the lab: etcd, agents with BIRD, pods wired by the real CNI
binary through the agent, and a policy taking effect."""
import re

import pytest

from podnet.naming import host_iface_name
from tests.lab.cluster import ingress_only_from, wait_for
from tests.lab.netns import sh
from tests.lab.prober import census

pytestmark = pytest.mark.root


def test_pods_on_two_nodes_talk_then_policy_denies(make_cluster):
    c = make_cluster(2)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"}, serve=["tcp:80"])
    b = c.add_pod("default", "b", "node2", labels={"app": "b"}, serve=["tcp:80"])
    assert a.iface.startswith("cali") and a.ip != b.ip
    wait_for(lambda: "proto bird" in c.routes("node1"), what="a BGP route on node1")
    assert c.ping(a, b.ip) and c.ping(b, a.ip)
    assert c.probe(a, b.ip, 80) and c.probe(b, a.ip, 80)
    c.apply(ingress_only_from("only-a", "b", "c"))
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


def _plain(rules: str) -> str:
    """iptables-save text without the agent's comment ids."""
    return re.sub(r' -m comment --comment "?cali:[0-9a-f]+"?', "", rules)


def test_a_scheduled_pod_is_programmed_before_its_add_which_touches_no_rule(make_cluster):
    """The agent programs a pod's chains as soon as the Pod is bound to its node, under the
    name the CNI plugin will give its veth, so the ADD only adds the pod's (address,
    interface) pair and its address to ipsets: not one iptables rule changes on the ADD's
    path, and the pod is still under its policy from the first packet."""
    c = make_cluster(1)
    node = c.lab.node("node1").ns
    c.apply(ingress_only_from("web-from-cli", "web", "cli"))
    cli = c.add_pod("default", "cli", "node1", labels={"app": "cli"})
    other = c.add_pod("default", "other", "node1", labels={"app": "other"})
    iface = host_iface_name("default", "web")
    c.schedule_pod("default", "web", "node1", labels={"app": "web"})
    wait_for(lambda: f"-A cali-tw-{iface} " in census(node).text, what="web's chains before its ADD")
    rules_before = census(node).text
    assert f"-A cali-from-wl-dispatch -i {iface} -g cali-fw-{iface}" in _plain(rules_before)
    web = c.add_pod("default", "web", "node1", labels={"app": "web"}, register=False, serve=["tcp:80"])
    assert web.iface == iface
    assert census(node).text == rules_before  # the ADD changed no rule
    assert f"{web.ip},{iface}" in sh("ipset", "list", "cali40wl-src", ns=node).stdout
    assert c.probe(cli, web.ip, 80) and not c.probe(other, web.ip, 80, timeout=0.5)
    # DEL: the pair goes at once, the chains stay while the Pod is bound here
    assert c.del_pod(web).returncode == 0
    assert f",{iface}" not in sh("ipset", "list", "cali40wl-src", ns=node).stdout
    assert f"-A cali-tw-{iface} " in census(node).text
    # Its containers end (as a Job's pod does): the chains go, though the Pod object stays.
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default",
                                                             "labels": {"app": "web"}},
             "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "none"}]},
             "status": {"phase": "Succeeded"}})
    wait_for(lambda: iface not in census(node).text, what="web's chains to go once it finished")
    # A pod bound here that never ran: its chains go when its Pod is deleted.
    idle_if = host_iface_name("default", "idle")
    c.schedule_pod("default", "idle", "node1", labels={"app": "web"})
    wait_for(lambda: f"-A cali-tw-{idle_if} " in census(node).text, what="idle's chains")
    c.delete("Pod", "idle", "default")
    wait_for(lambda: idle_if not in census(node).text, what="idle's chains to go with its Pod")
