"""Operating a node: the agent's health endpoints, metrics and logs, its graceful
shutdown and restart, and deploy/uninstall-node.sh — all on a real LabCluster (etcd,
agents with BIRD, pods wired by the real CNI binary)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab import sh
from tests.lab.cluster import LabCluster, ingress_only_from, wait_for
from tests.lab.cnibin import ROOT

pytestmark = pytest.mark.root

# `ts level logger msg key=value ...` (felix_agent/logs.py)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warning|error|critical) [\w.]+ \S")

POLICY = ingress_only_from("only-a", "b", "a")


def scrape(c: LabCluster, node: str) -> dict[str, list]:
    """/metrics parsed with prometheus_client's own parser: {family name: [samples]}."""
    code, body = c.http(node, "/metrics")
    assert code == 200, body
    return {f.name: f.samples for f in text_string_to_metric_families(body)}


def value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    for s in fams[family]:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{sample or family}{labels} not in /metrics")


def established_peers(c: LabCluster, node: str) -> int:
    return sum(1 for p in c.status(node)["bgp_peers"] if "Established" in p.get("info", ""))


# -- 1. health, metrics, logs -------------------------------------------------------------

def test_readiness_waits_for_first_sync_and_metrics_describe_the_node(make_cluster):
    c = make_cluster(2, start=False)
    c.etcd.stop()  # the agent starts while its datastore is unreachable
    c.start_agent("node1", wait=False)
    wait_for(lambda: c.http("node1", "/livez")[0] == 200, what="/livez of node1")
    for _ in range(3):  # not ready, and it says why, for as long as etcd is away
        code, body = c.http("node1", "/readyz")
        assert code == 503 and '"in_sync": false' in body and "datastore" in body, body
        time.sleep(0.3)
    assert value(scrape(c, "node1"), "tortie_datastore_in_sync") == 0
    c.etcd.start()  # same port and data: the forwarder reaches it again
    c.wait_ready("node1", timeout=90)
    assert c.http("node1", "/readyz")[0] == 200
    c.start_agent("node2")

    a = c.add_pod("default", "a", "node1", labels={"app": "a"}, serve=["tcp:80"])
    a2 = c.add_pod("default", "a2", "node1", labels={"app": "a"})
    b = c.add_pod("default", "b", "node2", labels={"app": "b"}, serve=["tcp:80"])
    c.apply(POLICY)
    wait_for(lambda: c.status("node1")["applies"] > 0 and established_peers(c, "node1") == 1,
             timeout=60, what="node1's BGP session to node2")
    assert c.probe(a2, b.ip, 80)

    # Scraped without asking /status first: the node-state gauges are read at scrape time.
    def metrics_settled():
        m = scrape(c, "node1")
        return m if value(m, "tortie_policies") == 1 and value(m, "tortie_ipset_members") > 0 else None
    m = wait_for(metrics_settled, what="the policy in node1's metrics")
    print("\nnode1 /metrics:", {k: [(s.labels, s.value) for s in v if not s.name.endswith(("_bucket", "_created"))]
                                for k, v in m.items() if k.startswith("tortie_")})
    assert value(m, "tortie_endpoints") == 2  # a, a2
    assert value(m, "tortie_ipam_addresses_in_use") == 2  # was stuck at the first pod's count
    assert value(m, "tortie_ipam_blocks") == 1
    assert value(m, "tortie_bgp_sessions_up") == 1  # one peer in a 2-node mesh
    assert value(m, "tortie_datastore_in_sync") == 1
    for driver in ("ipsets", "iptables-filter", "iptables-nat", "routes", "bird"):
        assert value(m, "tortie_dataplane_apply_seconds", "tortie_dataplane_apply_seconds_count",
                     driver=driver) > 0, driver
    for kind in ("Pod", "NetworkPolicy", "Node", "IPPool"):
        assert value(m, "tortie_datastore_events", "tortie_datastore_events_total", kind=kind) >= 1, kind
    assert value(m, "tortie_iptables_rules", table="filter") > 0
    for kind in ("dataplane", "datastore", "metrics"):  # exported from the start, by kind
        assert value(m, "tortie_errors", "tortie_errors_total", kind=kind) >= 0, kind
    assert value(m, "tortie_errors", "tortie_errors_total", kind="dataplane") == 0
    # A pod added now changes no pool, block or node: the IPAM gauges still follow.
    c.add_pod("default", "a3", "node1", labels={"app": "a"})
    m = scrape(c, "node1")
    assert value(m, "tortie_ipam_addresses_in_use") == 3 and value(m, "tortie_endpoints") == 3
    # the other node agrees from its side
    m2 = scrape(c, "node2")
    assert value(m2, "tortie_endpoints") == 1 and value(m2, "tortie_ipam_addresses_in_use") == 1
    assert value(m2, "tortie_bgp_sessions_up") == 1

    # Structured logs: every line the agent's logger wrote has the documented shape.
    log = c.agent_log("node1")
    lines = [ln for ln in log.splitlines() if ln[:4].isdigit()]
    assert lines and all(LOG_LINE.match(ln) for ln in lines), [ln for ln in lines if not LOG_LINE.match(ln)][:3]
    starting = next(ln for ln in lines if " tortie.main starting " in ln)
    assert " node=node1 " in starting and " datastore=etcd " in starting
    assert any(" warning " in ln and "etcd" in ln for ln in lines)  # the outage was logged as such
    assert re.search(r" info tortie.agent datastore sync in_sync=True ", log)
    assert re.search(r" info tortie.agent dataplane programmed seconds=\d+\.\d{3} ", log)


# -- 2. graceful shutdown and restart -----------------------------------------------------

def kernel_state(c: LabCluster, node: str, backend: str) -> dict[str, list[str]]:
    ns = c.lab.node(node).ns
    rules = sh(f"iptables-{backend}-save", ns=ns).stdout
    sets = sh("ipset", "save", ns=ns).stdout
    return {
        "iptables": sorted(ln for ln in rules.splitlines() if "cali" in ln and not ln.startswith("#")),
        "ipsets": sorted(ln for ln in sets.splitlines() if " cali40" in ln),
        "routes": sorted(sh("ip", "route", "show", ns=ns).stdout.splitlines()),
    }


def rule_packets(c: LabCluster, node: str, backend: str) -> dict[str, int]:
    """Packet counter of every cali rule; a rewritten rule starts again from 0."""
    out = sh(f"iptables-{backend}-save", "-c", ns=c.lab.node(node).ns).stdout
    counts: dict[str, int] = {}
    for ln in out.splitlines():
        m = re.match(r"^\[(\d+):\d+\] (-A .*cali.*)$", ln)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts


def bird_pid(c: LabCluster, node: str) -> int:
    with open(os.path.join(c.node_dir(c.lab.node(node)), "run", "bird", "bird.pid")) as f:
        return int(f.read().strip())


def test_sigterm_leaves_the_dataplane_and_the_restarted_agent_adopts_it(make_cluster):
    c = make_cluster(2)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"}, serve=["tcp:80"])
    x = c.add_pod("default", "x", "node1", labels={"app": "x"})
    b = c.add_pod("default", "b", "node2", labels={"app": "b"}, serve=["tcp:80"])
    c.apply(POLICY)
    wait_for(lambda: not c.probe(x, b.ip, 80, timeout=0.5), what="the policy to deny x -> b")
    wait_for(lambda: "proto bird" in c.routes("node1"), what="a BGP route on node1")
    assert c.probe(a, b.ip, 80) and c.probe(b, a.ip, 80)
    backend = c.status("node1")["iptables_backend"]
    before = kernel_state(c, "node1", backend)
    assert before["iptables"] and before["ipsets"] and any("proto bird" in r for r in before["routes"])
    pid = bird_pid(c, "node1")
    agent = c.agents["node1"]

    t0 = time.monotonic()
    c.stop_agent("node1", signal.SIGTERM, timeout=10)  # raises if it takes longer
    print(f"\nagent exit after SIGTERM: {time.monotonic() - t0:.2f}s")
    assert agent.returncode == 0
    assert "shutting down; the dataplane stays in place" in c.agent_log("node1")
    # Nothing moved: chains, ipsets, routes, BIRD; pods talk and the policy still holds.
    assert kernel_state(c, "node1", backend) == before
    os.kill(pid, 0)
    assert c.probe(a, b.ip, 80) and c.probe(b, a.ip, 80)
    assert not c.probe(x, b.ip, 80, timeout=0.5)
    counters = rule_packets(c, "node1", backend)

    log_offset = len(c.agent_log("node1"))
    c.start_agent("node1")
    # Ready means in sync AND a dataplane pass has completed: the adoption has happened.
    restarted = c.agent_log("node1")[log_offset:]
    programmed = [ln for ln in restarted.splitlines() if "dataplane programmed" in ln]
    print("restarted agent's dataplane passes:", programmed or "none (nothing to change)")
    for ln in programmed:  # no chain, rule, set member or BIRD process churn on adoption
        for churn in ("chains_created=['", "chains_deleted=['", "rules_inserted=[1-9]", "rules_deleted=[1-9]",
                      "rules_replaced=[1-9]", "members_removed=[1-9]", "recreated=['", "bird=started", "routes="):
            assert not re.search(churn, ln), ln
    assert kernel_state(c, "node1", backend) == before
    assert bird_pid(c, "node1") == pid
    after = rule_packets(c, "node1", backend)
    assert counters and all(after.get(rule, -1) >= n for rule, n in counters.items()), \
        "a cali rule was rewritten (its packet counter went back)"
    assert [e["pod"] for e in c.status("node1")["endpoints"]] == ["a", "x"]
    assert c.probe(a, b.ip, 80) and not c.probe(x, b.ip, 80, timeout=0.5)
    late = c.add_pod("default", "late", "node1", labels={"app": "a"})  # the adopted agent serves CNI
    assert c.probe(late, b.ip, 80)


# -- 3. uninstall-node.sh ------------------------------------------------------------------

def uninstall(ns: str, host) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "sh", os.path.join(ROOT, "deploy", "uninstall-node.sh")],
                          env={**os.environ, "HOST_ROOT": str(host)}, capture_output=True, text=True, timeout=60)


def test_uninstall_node_removes_tortie_and_nothing_else(make_cluster, tmp_path):
    c = make_cluster(1)
    a = c.add_pod("default", "a", "node1", labels={"app": "a"})
    c.add_pod("default", "b", "node1", labels={"app": "b"})
    c.apply(POLICY)
    wait_for(lambda: "cali-pi-" in sh("iptables-save", ns=c.lab.node("node1").ns).stdout +
             sh("iptables-legacy-save", ns=c.lab.node("node1").ns, check=False).stdout,
             what="the policy chain")
    backend = c.status("node1")["iptables_backend"]
    c.stop_agent("node1")  # the DaemonSet is deleted first; BIRD dies with its container
    ns = c.lab.node("node1").ns
    ipt = f"iptables-{backend}"
    # Someone else's state on the node, which must survive.
    for args in (["-N", "FOREIGN-FW"], ["-A", "FOREIGN-FW", "-s", "10.99.0.0/16", "-j", "ACCEPT"],
                 ["-I", "FORWARD", "-j", "FOREIGN-FW"],
                 # a foreign chain that jumps to ours: that one rule must go, or our chain cannot
                 ["-A", "FOREIGN-FW", "-d", "10.65.0.0/16", "-j", "cali-FORWARD"],
                 ["-t", "nat", "-A", "POSTROUTING", "-s", "10.98.0.0/16", "-j", "MASQUERADE"]):
        sh(ipt, "-w", *args, ns=ns)
    sh("ipset", "create", "foreign-set", "hash:ip", ns=ns)
    sh("ipset", "add", "foreign-set", "10.99.0.1", ns=ns)
    sh("ip", "route", "add", "10.99.0.0/24", "via", "192.168.100.1", "proto", "static", ns=ns)
    host = tmp_path / "host"
    bundle = tmp_path / "bundle"  # the host's files as deploy/install-cni.sh lays them out
    bundle.mkdir()
    (bundle / "tortie-cni").write_text("#!/bin/sh\n")
    (bundle / "tortie-cni").chmod(0o755)
    (tmp_path / "conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "tortie"}]}))
    p = subprocess.run(["sh", os.path.join(ROOT, "deploy", "install-cni.sh")], capture_output=True, text=True,
                       env={**os.environ, "HOST_ROOT": str(host), "CNI_BIN_SRC": str(bundle),
                            "CNI_CONFLIST_FILE": str(tmp_path / "conflist"), "CNI_VALIDATE": "cat"})
    assert p.returncode == 0, p.stderr
    (host / "opt/cni/bin/portmap").write_text("other plugin")
    (host / "etc/cni/net.d/10-tortie.conflist").write_text("{}")
    (host / "etc/cni/net.d/20-other.conflist").write_text("{}")
    # tortie's route driver marks its routes with protocol 80 (direct/ipip/vxlan modes)
    sh("ip", "route", "add", "blackhole", "10.65.7.0/26", "proto", "80", ns=ns)
    for d in ("var/lib/tortie/ipam", "var/run/tortie"):
        (host / d).mkdir(parents=True)

    p = uninstall(ns, host)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tortie removed" in p.stdout and not p.stderr.strip(), p.stderr

    for b in ("nft", "legacy"):
        saved = "\n".join(sh(f"{v}-{b}-save", "-t", t, ns=ns, check=False).stdout
                          for v in ("iptables", "ip6tables") for t in ("filter", "nat", "raw"))
        assert "cali" not in saved, (b, [ln for ln in saved.splitlines() if "cali" in ln][:5])
    kept = sh(f"{ipt}-save", ns=ns).stdout
    assert ":FOREIGN-FW" in kept and "-A FORWARD -j FOREIGN-FW" in kept
    assert "-A FOREIGN-FW -s 10.99.0.0/16 -j ACCEPT" in kept
    assert "-s 10.98.0.0/16 -j MASQUERADE" in sh(f"{ipt}-save", "-t", "nat", ns=ns).stdout
    sets = sh("ipset", "list", "-n", ns=ns).stdout.split()
    assert sets == ["foreign-set"], sets
    routes = sh("ip", "route", "show", ns=ns).stdout
    assert "10.99.0.0/24 via 192.168.100.1 dev eth0 proto static" in routes and " proto 80 " not in routes + " "
    assert sorted(os.listdir(host / "opt/cni/bin")) == ["portmap"]
    assert sorted(os.listdir(host / "etc/cni/net.d")) == ["20-other.conflist"]
    assert not (host / "var/lib/tortie").exists() and not (host / "var/run/tortie").exists()
    # run twice: nothing left to remove is not an error
    again = uninstall(ns, host)
    assert again.returncode == 0 and not again.stderr.strip(), again.stderr
    assert a.ip  # the pod's namespace is still there; its veth and route are the runtime's to remove
