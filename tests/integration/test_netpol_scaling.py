"""Policy scales with pods PLUS policies, never with pairs of pods.

A real agent on one lab node programs M policies over P local pods (real pods wired by the
CNI plugin) plus many remote pods (Pod records of another node, as the datastore delivers
them).  Every policy allows a peer selector that matches all the client pods, so a
per-pair design would need a rule per client per policy.  What the census of the node's
filter table and ipsets shows instead:

- the policy chains do not change at all when clients come and go; their size is linear
  in M (every policy here has the same shape);
- every local endpoint costs the same fixed number of rules whatever M is, so the total
  is additive: rules(P2, M) - rules(P1, M) is the same for every M;
- remote pods cost no rule at all, only ipset members;
- a local pod's address is a member of one set (cali40wl-src, anti-spoofing), never a rule;
- a label change moves ipset members and leaves every cali chain byte-for-byte the same.
"""
from __future__ import annotations

import json

import pytest

from tests.lab.cluster import wait_for
from tests.lab.prober import Census, census, synthetic_endpoints, write_records

pytestmark = pytest.mark.root

SERVERS_NS, CLIENTS_NS = "srv", "cli"


def policy(i: int) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"srv-{i}", "namespace": SERVERS_NS},
            "spec": {"podSelector": {"matchLabels": {"app": f"srv-{i}"}},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "cli"}},
                                            "podSelector": {"matchLabels": {"role": "client"}}}],
                                  "ports": [{"port": 8000 + i}, {"protocol": "UDP", "port": 53}]}],
                     "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "cli"}}}]}]}}


def pod_doc(ns: str, name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "none"}]}}


def test_rules_grow_with_pods_plus_policies_not_pairs(make_cluster):
    c = make_cluster(1)
    node = c.lab.node("node1").ns
    c.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SERVERS_NS, "labels": {"team": "srv"}}},
             {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CLIENTS_NS, "labels": {"team": "cli"}}}])
    pods: dict[str, object] = {}

    def servers(rng: range) -> None:
        c.apply([pod_doc(SERVERS_NS, f"srv-{i}", {"app": f"srv-{i}"}) for i in rng])
        for i in rng:
            pods[f"srv-{i}"] = c.add_pod(SERVERS_NS, f"srv-{i}", "node1", register=False)

    def clients(rng: range) -> None:
        c.apply([pod_doc(CLIENTS_NS, f"cli-{i}", {"role": "client"}) for i in rng])
        for i in rng:
            pods[f"cli-{i}"] = c.add_pod(CLIENTS_NS, f"cli-{i}", "node1", register=False)

    def settle(m: int, local_clients: int, all_clients: int) -> Census:
        """Wait for the agent to program exactly this state, then count."""
        def done():
            s = census(node)
            tw = sum(1 for ln in s.text.splitlines() if ln.startswith(":cali-tw-"))
            peers = max((v for n, v in s.sets.items() if n != "cali40wl-src"), default=0)
            # cali40wl-src: one (address, interface) pair per local pod (m servers + clients)
            ok = (s.policy_chains == 2 * m and tw == m + local_clients and peers == all_clients
                  and s.sets.get("cali40wl-src") == m + local_clients)
            return s if ok else None
        return wait_for(done, timeout=60, interval=0.3, what=f"M={m} P={local_clients} programmed")

    servers(range(3))
    clients(range(6))
    c.apply([policy(i) for i in range(3)])
    s1 = settle(3, 6, 6)
    clients(range(6, 18))
    s2 = settle(3, 18, 18)
    servers(range(3, 9))
    c.apply([policy(i) for i in range(3, 9)])
    s3 = settle(9, 18, 18)
    for i in range(6, 18):
        assert c.del_pod(pods.pop(f"cli-{i}")).returncode == 0
    c.tortiectl("delete", "-f", "-", input="\n---\n".join(
        json.dumps(pod_doc(CLIENTS_NS, f"cli-{i}", {})) for i in range(6, 18)))
    s4 = settle(9, 6, 6)
    print(f"census (P local clients, M policies): (6,3) {s1.rules} rules/{s1.members} members; "
          f"(18,3) {s2.rules}/{s2.members}; (18,9) {s3.rules}/{s3.members}; (6,9) {s4.rules}/{s4.members}")

    # Clients never touch the policy chains; their size is linear in M.
    assert s1.policy_rules == s2.policy_rules and s3.policy_rules == s4.policy_rules
    assert s3.policy_rules == 3 * s1.policy_rules
    # A local endpoint costs a fixed number of rules, whatever the number of policies...
    per_pod = (s2.rules - s1.rules) / 12
    assert s3.rules - s4.rules == s2.rules - s1.rules, "per-endpoint cost depends on the number of policies"
    assert per_pod == int(per_pod) and 1 <= per_pod <= 4, per_pod
    # ...and a policy a fixed number, whatever the number of pods (the same equation read
    # the other way: no P x M term).
    assert s3.rules - s2.rules == s4.rules - s1.rules

    # 500 remote clients: not one rule more, 500 more members in each client set.
    far = synthetic_endpoints(CLIENTS_NS, "far", 500, "node9", {"role": "client"}, "10.66.0.0", wired=False)
    write_records(c.etcd.endpoint, far)
    s5 = settle(9, 6, 506)
    assert s5.text == s4.text
    assert {n: v - s4.sets.get(n, 0) for n, v in s5.sets.items()} == {n: (500 if v == 6 else 0)
                                                                    for n, v in s4.sets.items()}
    print(f"+500 remote clients: rules {s4.rules} -> {s5.rules}, ipset members {s4.members} -> {s5.members}")

    # A label change (a local and a remote client stop being clients): members only.
    c.apply(pod_doc(CLIENTS_NS, "cli-3", {"role": "gone"}))
    write_records(c.etcd.endpoint, synthetic_endpoints(CLIENTS_NS, "far", 1, "node9", {"role": "gone"},
                                                       "10.66.0.0", wired=False, start=7))
    s6 = wait_for(lambda: (lambda s: s if 504 in s.sets.values() else None)(census(node)),
                  timeout=60, interval=0.3, what="the relabelled clients to leave the role=client set")
    assert s6.text == s5.text, "a label change rewrote iptables rules"
    changed = {n: s6.sets[n] - s5.sets[n] for n in s5.sets if s6.sets[n] != s5.sets[n]}
    assert list(changed.values()) == [-2], changed
