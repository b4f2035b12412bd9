"""The agent's DEL answers before the kernel has destroyed the veth (felix_agent/dataplane/retired_links.py),
and that changes nothing a runtime or another pod can see: when DEL returns, the pod is cut
off, its host route and its name are gone and its address is free; the retired veth is
deleted shortly after, also when it was left behind by an agent that stopped before reaping.
Real agent, real etcd, the built binary, in the netns lab."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from podnet.plumbing import RETIRED_GROUP, RETIRED_PREFIX
from tests.lab.cluster import wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root


def links(c, node: str) -> list[dict]:
    return json.loads(sh("ip", "-j", "-d", "link", "show", ns=c.lab.node(node).ns).stdout)


def retired(c, node: str) -> list[str]:
    return [link["ifname"] for link in links(c, node) if link["ifname"].startswith(RETIRED_PREFIX)]


def pod_eth0_up(c, pod) -> bool:
    """The pod's eth0 still exists and has carrier (its host peer is up)."""
    out = sh("ip", "-j", "link", "show", "eth0", ns=pod.ns, check=False)
    if out.returncode != 0:
        return False
    return "LOWER_UP" in json.loads(out.stdout)[0]["flags"]


def allocated_ips(c, node: str) -> set[str]:
    return {a["ip"] for a in c.status(node)["ipam"]["allocation_list"]}


def test_del_answers_with_the_pod_cut_off_and_the_veth_deleted_soon_after(make_cluster):
    c = make_cluster(1)
    a = c.add_pod("default", "a", "node1", serve=["tcp:80"])
    b = c.add_pod("default", "b", "node1")
    assert c.probe(b, a.ip, 80)

    p = c.del_pod(a)
    assert p.returncode == 0, p.stdout
    # Everything below holds the moment DEL has answered, before any reaping.
    names = {link["ifname"] for link in links(c, "node1")}
    assert a.iface not in names, "the pod's host veth name is still taken"
    assert f"{a.ip} " not in c.routes("node1") + " ", "the pod's host route survived DEL"
    assert not pod_eth0_up(c, a), "the deleted pod still has a working link"
    assert a.ip not in allocated_ips(c, "node1")
    assert not c.probe(b, a.ip, 80, timeout=0.5)

    wait_for(lambda: not retired(c, "node1"), timeout=10, what="the retired veth to be deleted")
    wait_for(lambda: sh("ip", "link", "show", "eth0", ns=a.ns, check=False).returncode != 0, timeout=10,
             what="the pod end of the veth to go with it")
    # the other pod is untouched by the reaping
    assert b.iface in {link["ifname"] for link in links(c, "node1")}
    assert c.ping(b, c.lab.node("node1").ip)


def test_a_pod_deleted_and_added_again_at_once_gets_a_working_link(make_cluster):
    """The retired veth has left the pod's name: the next sandbox of the same pod is wired
    without waiting for the old veth to be destroyed, in the same netns (a runtime retrying
    ADD after DEL: its eth0 is still the far end of the retired veth) or in a new one."""
    c = make_cluster(1)
    node = c.lab.node("node1")
    server = c.add_pod("default", "server", "node1", serve=["tcp:80"])
    web = c.add_pod("default", "web", "node1")
    assert c.del_pod(web).returncode == 0
    again = c.cni_run(node, "ADD", web.container_id + "-2", f"/var/run/netns/{web.ns}", "default", "web")
    assert again.returncode == 0, again.stdout
    assert c.probe(web.ns, server.ip, 80)
    p = c.cni_run(node, "DEL", web.container_id + "-2", f"/var/run/netns/{web.ns}", "default", "web")
    assert p.returncode == 0, p.stdout
    sh("ip", "netns", "del", web.ns)  # the runtime removes the sandbox; a new one follows
    web2 = c.add_pod("default", "web", "node1", register=False)
    assert web2.iface == web.iface
    assert c.probe(web2, server.ip, 80)
    wait_for(lambda: not retired(c, "node1"), timeout=10, what="the retired veths to be deleted")
    assert [link["ifname"] for link in links(c, "node1")].count(web.iface) == 1


def test_a_burst_of_dels_leaves_nothing(make_cluster):
    c = make_cluster(1)
    pods = [c.add_pod("default", f"p{i}", "node1") for i in range(8)]
    with ThreadPoolExecutor(max_workers=len(pods)) as pool:
        runs = list(pool.map(c.del_pod, pods))
    assert all(r.returncode == 0 for r in runs), [r.stdout for r in runs if r.returncode]
    wait_for(lambda: not retired(c, "node1"), timeout=10, what="every retired veth to be deleted")
    assert not [link for link in links(c, "node1") if link["ifname"].startswith("cali")]
    assert not allocated_ips(c, "node1")
    assert c.status("node1")["endpoints"] == []


def test_retired_links_left_by_a_stopped_agent_are_deleted_at_start(make_cluster):
    """An agent that stopped between retiring and reaping (a crash): the next one deletes
    the leftovers before serving, and nothing outside our link group."""
    c = make_cluster(1)
    node = c.lab.node("node1")
    c.stop_agent(node)
    leftover = f"{RETIRED_PREFIX}beef"
    sh("ip", "link", "add", leftover, "type", "veth", "peer", "name", "x-peer1", ns=node.ns)
    sh("ip", "link", "set", leftover, "group", str(RETIRED_GROUP), ns=node.ns)
    sh("ip", "link", "add", "other0", "type", "veth", "peer", "name", "x-peer2", ns=node.ns)
    sh("ip", "link", "set", "other0", "group", "7", ns=node.ns)
    c.start_agent(node)
    wait_for(lambda: leftover not in {link["ifname"] for link in links(c, "node1")}, timeout=20,
             what="the agent to delete the leftover retired veth")
    assert "other0" in {link["ifname"] for link in links(c, "node1")}
