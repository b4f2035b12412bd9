"""Flow logs on the real data path: two lab nodes whose agents run with flow_logs on,
real iptables NFLOG rules, real packets, the agent's nfnetlink_log reader, `tortiectl
flows` inside the node.

x/s (node1) serves TCP 80 and UDP 81.  A ClusterNetworkPolicy denies y -> x on TCP 80;
the NetworkPolicy x/allow-x lets x in and nobody else.  So y/c -> x/s:80 is denied by the
CNP, y/c -> x/s:81 by the NetworkPolicy tier's default deny, and x/c2 -> x/s:80 is
allowed by x/allow-x (a sampled allow).  Each must show in `tortiectl flows` naming its
policy within the issue's 2 s, over IPv4 and again over IPv6 (the pods are dual-stack:
ip6tables' chains log too, and the reader parses IPv6 headers).  A flood over many ports then fills the flow table: it
holds at most flow_log_max_flows flows and counts the rest as evicted.  node2's agent
finds its NFLOG group already taken and says so in its status, running on.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from felix_agent.dataplane.nflog import NflogSocket
from tests.lab.cluster import VENV_BIN, LabCluster, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root

MAX_FLOWS = 60
SHOW_WITHIN = 2.0  # the acceptance: a denied connection shows within 2 s
POOL6 = "fd65::/48"  # a second pool: every pod gets an IPv6 address too

CNP = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
       "metadata": {"name": "no-y-web"},
       "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                "ingress": [{"name": "block-y", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}],
                             "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}}
NP = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
      "metadata": {"name": "allow-x", "namespace": "x"},
      "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}}

FLOOD = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[2])
port = 2000
while time.monotonic() < end:
    s.sendto(b"x", (sys.argv[1], port))
    port = 2000 + (port - 1999) % 3000
"""


def flows(c: LabCluster, node: str, *args: str) -> list[dict]:
    """`tortiectl flows -o json` run inside the node, as an operator would."""
    p = sh(os.path.join(VENV_BIN, "tortiectl"), "flows", "-o", "json", *args, ns=c.lab.node(node).ns)
    return json.loads(p.stdout)


def api_flows(c: LabCluster, node: str) -> list[dict]:
    code, body = c.http(node, "/flows")
    assert code == 200, body
    return json.loads(body)["flows"]


def shows_within(c: LabCluster, node: str, want, what: str) -> dict:
    """The first flow `want` accepts, polled until the issue's deadline after the probe."""
    deadline = time.monotonic() + SHOW_WITHIN
    while True:
        hit = next((f for f in api_flows(c, node) if want(f)), None)
        if hit is not None:
            return hit
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not in /flows within {SHOW_WITHIN}s: {api_flows(c, node)}")
        time.sleep(0.05)


def test_denied_and_allowed_flows_show_with_their_policy_and_the_table_stays_bounded(make_cluster):
    c = make_cluster(2, start=False, agent_args=("--flow-logs", "true", "--flow-log-max-flows", str(MAX_FLOWS)),
                     pool6=POOL6)
    # Someone else holds node2's NFLOG group 20: its agent must say so and run on.
    squatter = NflogSocket(20, c.lab.node("node2").ns)
    try:
        c.start_agents()
        fl2 = c.status("node2")["flow_logs"]
        assert fl2["state"] == "unavailable" and "group 20" in fl2["reason"], fl2
        assert c.status("node1")["flow_logs"]["state"] == "on"

        c.apply_namespace("x", {"ns": "x"})
        c.apply_namespace("y", {"ns": "y"})
        s = c.add_pod("x", "s", "node1", labels={"app": "s"}, serve=["tcp:80", "udp:81"])
        c2 = c.add_pod("x", "c2", "node1", labels={"app": "c2"})
        y = c.add_pod("y", "c", "node2", labels={"app": "c"})
        assert c.probe(y, s.ip, 80)
        c.apply([CNP, NP])
        wait_for(lambda: not c.probe(y, s.ip, 80, timeout=0.3), what="the CNP's deny")

        assert y.ip6 and s.ip6 and c2.ip6
        for family, (src, dst, sampled) in ((4, (y.ip, s.ip, c2.ip)), (6, (y.ip6, s.ip6, c2.ip6))):
            over = f" over IPv{family}"  # IPv6: ip6tables' chains log with the same policies
            # 1. a CNP Deny
            assert not c.probe(y, dst, 80, timeout=0.5)
            f = shows_within(c, "node1", lambda f: (f["src"], f["dst"], f["dport"], f["proto"]) ==
                             (src, dst, 80, "tcp") and f["verdict"] == "deny", "y/c -> x/s:80 denied" + over)
            assert (f["tier"], f["policy"], f["rule"], f["rule_name"]) == \
                   ("Admin", "ClusterNetworkPolicy/no-y-web", 0, "block-y"), f
            assert (f["src_name"], f["dst_name"], f["direction"]) == ("y/c", "x/s", "ingress"), f

            # 2. the NetworkPolicy tier's default deny (UDP 81: the CNP does not match it)
            assert not c.probe(y, dst, 81, proto="udp", timeout=0.5)
            f = shows_within(c, "node1", lambda f: (f["dst"], f["dport"], f["verdict"]) == (dst, 81, "deny"),
                             "y/c -> x/s:81 denied" + over)
            assert (f["tier"], f["policy"], f["rule"], f["proto"]) == \
                   ("NetworkPolicy", "NetworkPolicy x/allow-x", -1, "udp"), f

            # 3. an allowed connection, sampled
            assert c.probe(c2, dst, 80)
            f = shows_within(c, "node1", lambda f: f["src"] == sampled and f["verdict"] == "allow",
                             "x/c2 -> x/s:80" + over)
            assert (f["policy"], f["rule"], f["dport"], f["dst_name"]) == ("NetworkPolicy x/allow-x", 0, 80, "x/s"), f

        # tortiectl flows: the filters, and the table view names the policy
        denied = flows(c, "node1", "--denied", "-n", "y")
        assert denied and all(d["verdict"] == "deny" and d["src_name"] == "y/c" for d in denied), denied
        table = sh(os.path.join(VENV_BIN, "tortiectl"), "flows", "--denied", ns=c.lab.node("node1").ns).stdout
        assert "Admin: ClusterNetworkPolicy/no-y-web rule 0 (block-y)" in table, table
        assert f"y/c ({y.ip6})" in table and f"x/s ({s.ip6})" in table, table
        code, metrics = c.http("node1", "/metrics")
        assert 'tortie_flow_logged_packets_total{policy="ClusterNetworkPolicy/no-y-web",tier="Admin",' \
               'verdict="deny"}' in metrics, metrics[-2000:]

        # 4. a flood over 3000 ports: at most MAX_FLOWS flows kept, the rest evicted
        sh(sys.executable, "-c", FLOOD, s.ip, "3", ns=y.ns, timeout=30)
        st = wait_for(lambda: (lambda fl: fl if fl["evicted"] > 0 else None)(c.status("node1")["flow_logs"]),
                      timeout=10, what="evictions")
        assert st["flows"] <= MAX_FLOWS and st["state"] == "on", st
        assert len(api_flows(c, "node1")) <= MAX_FLOWS
        c.wait_ready("node1")  # the agent is fine
        assert c.probe(c2, s.ip, 80)
    finally:
        squatter.close()
