"""Other writers' rules in FORWARD still see the workload traffic tortie's policy allowed.

kube-proxy REJECTs a new connection to a Service without endpoints from filter FORWARD
(KUBE-SERVICES, which it inserts at the top of FORWARD, so below our hook once we have
moved ours back to the top).  cali-FORWARD used to ACCEPT allowed workload traffic, so that
rule was never reached: the client timed out instead of being refused (the upstream spec
"Services should be rejected when no endpoints exist").  Now cali-FORWARD marks what it
allows and returns, and our last rule in FORWARD accepts marked packets.

Real two-node lab (etcd, agents, the real CNI binary); the "kube-proxy" here is one real
iptables REJECT rule in the same place and form kube-proxy writes (ctstate NEW, reject with
a TCP reset) for a destination that has a listener, so accepting it early would connect.
Both nodes' FORWARD policy is DROP (as Docker leaves it), so pod traffic that still flows
was accepted by our last rule.
"""
from __future__ import annotations

import sys

import pytest

from tests.lab import sh
from tests.lab.cluster import wait_for

pytestmark = pytest.mark.root

# A connect from inside a pod that tells a refusal from a timeout and from a success.
CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(); s.settimeout(3)\n"
    "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print(s.recv(8).decode().strip() or 'connected')\n"
    "except ConnectionRefusedError: print('refused')\n"
    "except OSError as e: print(type(e).__name__)\n")


def connect(c, pod, ip: str, port: int) -> str:
    return sh(sys.executable, "-c", CONNECT, ip, str(port), ns=pod.ns, check=False, timeout=20).stdout.strip()


def forward_rules(c, node: str, backend: str) -> list[str]:
    out = sh(f"iptables-{backend}-save", "-t", "filter", ns=c.lab.node(node).ns).stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A FORWARD ")]


def test_a_foreign_reject_below_our_hook_refuses_and_allowed_traffic_passes_a_drop_policy(make_cluster):
    c = make_cluster(2)
    a = c.add_pod("default", "a", "node1")
    b = c.add_pod("default", "b", "node2")
    c.serve(b, ["tcp:80", "tcp:81"])
    backend = c.status("node1")["iptables_backend"]
    for node in ("node1", "node2"):
        sh(f"iptables-{backend}", "-w", "-P", "FORWARD", "DROP", ns=c.lab.node(node).ns)
        wait_for(lambda: any("cali-FORWARD-accept" in r for r in forward_rules(c, node, backend)[-1:]),
                 what=f"{node}: our last rule in FORWARD")
    wait_for(lambda: connect(c, a, b.ip, 80) == "ok", what="a -> b:80 across nodes under a DROP policy")
    assert connect(c, a, b.ip, 81) == "ok"

    # kube-proxy's REJECT of a Service without endpoints, right below our top hook
    sh(f"iptables-{backend}", "-w", "-I", "FORWARD", "2", "-p", "tcp", "-d", b.ip, "--dport", "81",
       "-m", "conntrack", "--ctstate", "NEW", "-j", "REJECT", "--reject-with", "tcp-reset",
       ns=c.lab.node("node1").ns)
    rules = forward_rules(c, "node1", backend)
    assert "-j cali-FORWARD" in rules[0] and "REJECT" in rules[1] and "-j cali-FORWARD-accept" in rules[-1], rules
    assert connect(c, a, b.ip, 81) == "refused"  # before the fix: "ok" (cali-FORWARD accepted it)
    assert connect(c, a, b.ip, 80) == "ok"
    # ...and the agent leaves that order alone (our rules are where they belong)
    assert forward_rules(c, "node1", backend) == rules
