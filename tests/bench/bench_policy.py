"""Policy latency and cost on a busy node: how long from writing a NetworkPolicy (and a
ClusterNetworkPolicy) until the data path enforces it, with 100 and 1000 endpoints on the
node, 10 and 200 NetworkPolicies and 20 ClusterNetworkPolicies (Admin and Baseline).

A plain script (`make bench` runs it; root).  For each endpoint count it builds its own lab
cluster: real etcd, one node namespace running tortie-agent (with BIRD), two REAL pods
(client and server, wired by the CNI binary, TCP server on 80) and N-2 SYNTHETIC endpoints:
Pod + WorkloadEndpoint records as a CNI ADD writes them, each with a real veth pair
(cali<hash> on the node, its peer left unused in a sink namespace) created before the agent starts, so
the agent adopts them as endpoints it wired before a restart and programs their chains and
ipsets like any other.  No packet uses the synthetic ones; they carry labels and named ports
that the background policies select, so every timed apply recomputes and reconciles the
whole node.

--dual-stack N...: the same at N endpoints with every pod dual-stack (a second, IPv6 pool;
synthetic endpoints get an address of each family), the timed probes over IPv6, so the
figure is the ip6tables side's; printed next to the IPv4 rows of the same run, with the
rule and set counts of both families.

Timed loop, per repetition: the server is isolated (default deny ingress), then
  allow  `tortiectl apply` of a policy letting the client in  -> the first probe that connects
  deny   `tortiectl delete` of it                              -> the first probe that is dropped
and the same with a ClusterNetworkPolicy: an Admin-tier Accept of the client, which
overrides the NetworkPolicy deny, applied then deleted.
The client's prober (tests/lab/prober.py) sends a probe every 20 ms; the figure is the send
time of the first probe that sees the new state, measured from the start of the tortiectl
process (its own start-up, ~0.3 s of Python imports, included) and from its exit (the etcd
write done).  Also printed: rule, chain and ipset member counts, the agent's CPU time (its
own and its children's: iptables-restore, ipset) from /proc/<pid>/stat, its peak memory
(VmHWM), and the agent's own last dataplane pass duration.

    .venv/bin/python tests/bench/bench_policy.py [--endpoints 100 1000] [--policies 10 200]
        [--cluster-policies 20] [--reps 10] [--dual-stack 1000]
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from felix_agent.model import NamedPort, WorkloadEndpoint  # noqa: E402
from tests.lab import Etcd, Lab, new_prefix, sh  # noqa: E402
from tests.lab.cluster import LabCluster, wait_for  # noqa: E402
from tests.lab.prober import OK, TIMEOUT, Probe, Prober, census, synthetic_endpoints, write_records  # noqa: E402

POOL = "10.65.0.0/16"
POOL6 = "fd65::/48"
SYNTH_NET = "10.70.0.0"  # synthetic endpoints live outside the pool: no IPAM involved
SYNTH_NET6 = 0xfd70 << 112  # fd70::/16 likewise for their IPv6 addresses
NAMESPACES = 10
TICK = os.sysconf("SC_CLK_TCK")


def ns_name(i: int) -> str:
    return f"bench-{i % NAMESPACES}"


def synthetic(n: int, dual: bool = False) -> list:
    """n endpoints spread over the bench namespaces; labels app (20 values), tier (4);
    dual: an IPv6 address each too."""
    records = []
    for i in range(n):
        recs = synthetic_endpoints(ns_name(i), "ep", 1, "node1",
                                   {"app": f"app-{(i // NAMESPACES) % 20}", "tier": f"t{i % 4}"}, SYNTH_NET, start=i)
        if dual:
            ips = (*recs[0].ips, str(ipaddress.ip_address(SYNTH_NET6 + i)))
            recs = [dataclasses.replace(r, ips=ips) for r in recs]
        # A named port per pod, so named-port ipsets have members to compute.
        records += [dataclasses.replace(recs[0], ports=(NamedPort("http", 8080 + i % 3),)), recs[1]]
    return records


def background_policy(j: int) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"bg-{j}", "namespace": ns_name(j)},
            "spec": {"podSelector": {"matchLabels": {"app": f"app-{(j // NAMESPACES) % 20}"}},
                     "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"team-{j % 3}"}},
                                            "podSelector": {"matchLabels": {"tier": f"t{j % 4}"}}},
                                           {"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{j % 250}.0.0/16"]}},
                                           {"ipBlock": {"cidr": "fd00::/8", "except": [f"fd{j % 250:02x}::/16"]}}],
                                  "ports": [{"port": 8000 + j % 50}, {"port": "http"}]}],
                     "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": f"t{(j + 1) % 4}"}}}],
                                 "ports": [{"protocol": "UDP", "port": 53}, {"port": 9000, "endPort": 9100}]}]}}


def background_cluster_policy(j: int) -> dict:
    """Admin and Baseline CNPs over the bench namespaces (never the probe namespace, which
    has no team label), with peers, a port range and a CIDR, like background_policy."""
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": f"bg-cnp-{j}"},
            "spec": {"tier": "Admin" if j % 2 == 0 else "Baseline", "priority": j,
                     "subject": {"namespaces": {"matchLabels": {"team": f"team-{j % 3}"}}},
                     "ingress": [{"action": "Pass", "from": [{"pods": {"namespaceSelector": {},
                                                                       "podSelector": {"matchLabels": {"tier": f"t{j % 4}"}}}}]},
                                 {"action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": f"team-{(j + 1) % 3}"}}}],
                                  "protocols": [{"tcp": {"destinationPort": {"range": {"start": 9000, "end": 9100}}}}]}],
                     "egress": [{"action": "Accept", "to": [{"networks": [f"10.{j % 250}.0.0/16"]}]}]}}


def probe_cluster_policy(name: str) -> dict:
    """An Admin Accept of the client into the server: overrides the NetworkPolicy deny."""
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": "Admin", "priority": 0,
                     "subject": {"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "probe"}},
                                          "podSelector": {"matchLabels": {"pod": "server"}}}},
                     "ingress": [{"action": "Accept", "from": [{"pods": {
                         "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "probe"}},
                         "podSelector": {"matchLabels": {"pod": "client"}}}}]}]}}


def probe_policy(name: str, allow: bool) -> dict:
    ingress = [{"from": [{"podSelector": {"matchLabels": {"pod": "client"}}}]}] if allow else []
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "probe"},
            "spec": {"podSelector": {"matchLabels": {"pod": "server"}}, "policyTypes": ["Ingress"],
                     **({"ingress": ingress} if ingress else {})}}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, children's) CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")": state is field 3, so utime/stime/cutime/cstime (14-17) are [11:15]
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def vm_mb(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of /proc/<pid>/status in MB: VmHWM (the peak), VmRSS (now)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def driver_seconds(c: LabCluster) -> dict[str, tuple[float, int]]:
    """driver -> (total seconds, passes) from the agent's tortie_dataplane_apply_seconds."""
    code, body = c.http("node1", "/metrics")
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^tortie_dataplane_apply_seconds_(sum|count)\{driver="([^"]+)"\} (\S+)$', body, re.M):
        entry = out.setdefault(m.group(2), [0.0, 0])
        entry[0 if m.group(1) == "sum" else 1] = float(m.group(3))
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def make_veths(node_ns: str, sink_ns: str, weps: list[WorkloadEndpoint]) -> None:
    """The synthetic endpoints' host interfaces: a veth pair each, the cali end on the node
    and the other end in one shared "sink" namespace (where a real pod's eth0 would be in
    its own), so the node holds exactly one link per endpoint, like a real node."""
    lines = [f"link add {w.iface} type veth peer name tb{w.iface[4:]} netns {sink_ns}" for w in weps]
    for i in range(0, len(lines), 500):
        sh("ip", "-batch", "-", ns=node_ns, input="\n".join(lines[i:i + 500]) + "\n", timeout=120)


def timed_tortiectl(c: LabCluster, args: list[str], doc: dict | None) -> tuple[float, float]:
    """Run tortiectl; (monotonic start, monotonic exit)."""
    t0 = time.monotonic()
    c.tortiectl(*args, input=json.dumps(doc) if doc else None)
    return t0, time.monotonic()


@dataclasses.dataclass(frozen=True)
class Probing:
    """How the client probes: a new connection every `interval` s, each given `timeout` s.
    A probe whose SYN is dropped fails (TCP retransmits only after 1 s), so a finer pair
    shows whether the figures are the probes' resolution or the agent's."""

    timeout: float = 0.3
    interval: float = 0.02


def timed_reps(c: LabCluster, prober: Prober, server_ip: str, reps: int, apply_doc, delete_args,
               probing: Probing = Probing()) -> dict:
    """`reps` times: apply apply_doc(r) until the client gets in, delete it until it is out;
    the p50/p99 of each from tortiectl's start, and p50 from its exit."""
    allow, allow_w, deny, deny_w = [], [], [], []
    probe = Probe(server_ip, 80, "tcp", probing.timeout)
    for r in range(reps):
        t0, t1 = timed_tortiectl(c, ["apply", "-f", "-"], apply_doc(r))
        seen, _ = prober.until(probe, OK, interval=probing.interval, deadline=60)
        assert seen is not None, f"change {r} never took effect"
        allow.append(seen - t0)
        allow_w.append(max(0.0, seen - t1))
        t0, t1 = timed_tortiectl(c, delete_args(r), None)
        seen, _ = prober.until(probe, TIMEOUT, interval=probing.interval, deadline=60)
        assert seen is not None, f"deleting change {r} never took effect"
        deny.append(seen - t0)
        deny_w.append(max(0.0, seen - t1))
    return {"allow_p50": statistics.median(allow), "allow_p99": pct(allow, 0.99),
            "allow_from_write_p50": statistics.median(allow_w),
            "deny_p50": statistics.median(deny), "deny_p99": pct(deny, 0.99),
            "deny_from_write_p50": statistics.median(deny_w)}


def run(n_endpoints: int, policy_counts: list[int], reps: int, cluster_policies: int = 20,
        probing: Probing = Probing(), dual: bool = False) -> list[dict]:
    results = []
    stack = "dual-stack, probed over IPv6" if dual else "IPv4"
    with tempfile.TemporaryDirectory(prefix="tortie-bench-policy-") as work, Etcd() as etcd, \
            Lab(prefix=new_prefix("bp")) as lab:
        lab.build(1)
        node = lab.nodes[0]
        c = LabCluster(lab, etcd, work)
        c.apply_pool(POOL)
        if dual:
            c.apply_pool(POOL6, name="pool6", block_size=122)
        c.apply([{"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": ns_name(i), "labels": {"team": f"team-{i % 3}"}}} for i in range(NAMESPACES)]
                + [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "probe"}}])
        synth = synthetic(n_endpoints - 2, dual)
        t = time.monotonic()
        sink = lab.add_pod_ns("sink")
        make_veths(node.ns, sink, [r for r in synth if isinstance(r, WorkloadEndpoint)])
        write_records(etcd.endpoint, synth)
        t_synth = time.monotonic() - t
        t = time.monotonic()
        c.start_agents()
        agent = c.agents["node1"]
        server = c.add_pod("probe", "server", "node1", labels={"pod": "server"}, serve=["tcp:80"])
        client = c.add_pod("probe", "client", "node1", labels={"pod": "client"})
        prober = Prober(lab, client.ns, "probe/client")
        target = server.ip6 if dual else server.ip
        assert target, "the server has no IPv6 address"
        wait_for(lambda: sum(1 for ln in census(node.ns).text.splitlines() if ln.startswith(":cali-tw-"))
                 == n_endpoints, timeout=300, interval=1, what=f"{n_endpoints} endpoint chains")
        t_start = time.monotonic() - t
        print(f"-- {n_endpoints} endpoints on node1 ({stack}): 2 real pods (probe/client, probe/server), "
              f"{n_endpoints - 2} synthetic (records + veth pairs, {t_synth:.1f} s to create); "
              f"agent up and all endpoint chains programmed in {t_start:.1f} s", flush=True)
        applied = 0
        for k in policy_counts:
            # tortiectl writes one file in ONE etcd transaction, and etcd refuses more than
            # 128 operations per transaction (--max-txn-ops): apply in files of 100.
            for first in range(applied, k, 100):
                c.apply([background_policy(j) for j in range(first, min(k, first + 100))])
            applied = max(applied, k)
            c.apply([background_cluster_policy(j) for j in range(cluster_policies)])
            c.apply(probe_policy("server-deny", allow=False))
            t_deny, _ = prober.until(Probe(target, 80, "tcp", 0.3), TIMEOUT, deadline=120)
            assert t_deny is not None, "the server never got isolated"
            time.sleep(1.0)  # let the background policies' pass finish before timing
            cpu0, kids0 = cpu_seconds(agent.pid)
            drivers0 = driver_seconds(c)
            t_run = time.monotonic()
            timed = timed_reps(c, prober, target, reps, lambda r: probe_policy(f"allow-{r}", allow=True),
                               lambda r: ["delete", "networkpolicy", f"allow-{r}", "-n", "probe"], probing)
            cnp = timed_reps(c, prober, target, reps, lambda r: probe_cluster_policy(f"admit-{r}"),
                             lambda r: ["delete", "clusternetworkpolicy", f"admit-{r}"], probing)
            wall = time.monotonic() - t_run
            cpu1, kids1 = cpu_seconds(agent.pid)
            drivers1 = driver_seconds(c)
            c.delete("networkpolicy", "server-deny", "probe")
            s = census(node.ns)
            s6 = census(node.ns, 6)
            st = c.status("node1")
            res = {"endpoints": n_endpoints, "policies": k, "cluster_policies": cluster_policies, "reps": reps,
                   "stack": stack, "rules6": s6.rules, "ipsets6": len(s6.sets), "members6": s6.members,
                   **timed, "cnp": cnp,
                   "rules": s.rules, "chains": s.chains, "policy_rules": s.policy_rules,
                   "ipsets": len(s.sets), "members": s.members,
                   "agent_cpu": cpu1 - cpu0, "children_cpu": kids1 - kids0, "wall": wall,
                   "last_apply": st.get("last_apply_seconds", 0.0), "hwm_mb": vm_mb(agent.pid)}
            # One iptables-filter apply per dataplane pass (the ipsets driver is timed twice
            # per pass: updates first, deletions last), so passes are counted on it.
            passes = drivers1.get("iptables-filter", (0, 0))[1] - drivers0.get("iptables-filter", (0, 0))[1]
            res["passes"] = passes
            res["drivers_ms"] = {d: round((t - drivers0.get(d, (0, 0))[0]) / max(1, passes) * 1000)
                                 for d, (t, _) in sorted(drivers1.items())}
            results.append(res)
            print(f"   {k:4d} policies + {cluster_policies} CNPs: apply->enforced p50 {res['allow_p50'] * 1000:6.0f} ms "
                  f"p99 {res['allow_p99'] * 1000:6.0f} ms (after tortiectl exited: p50 "
                  f"{res['allow_from_write_p50'] * 1000:5.0f} ms) | delete->enforced p50 "
                  f"{res['deny_p50'] * 1000:6.0f} ms p99 {res['deny_p99'] * 1000:6.0f} ms (after tortiectl exited: p50 "
                  f"{res['deny_from_write_p50'] * 1000:5.0f} ms)", flush=True)
            print(f"                 an Admin CNP Accept over that deny: apply->enforced p50 "
                  f"{cnp['allow_p50'] * 1000:6.0f} ms p99 {cnp['allow_p99'] * 1000:6.0f} ms (after tortiectl exited: "
                  f"p50 {cnp['allow_from_write_p50'] * 1000:5.0f} ms) | delete->enforced p50 "
                  f"{cnp['deny_p50'] * 1000:6.0f} ms", flush=True)
            print(f"                 {s.rules} rules in {s.chains} cali chains ({s.policy_rules} in policy chains), "
                  f"{len(s.sets)} ipsets / {s.members} members; ip6tables {s6.rules} rules, "
                  f"{len(s6.sets)} cali60 ipsets / {s6.members} members; agent CPU {res['agent_cpu']:.1f} s own + "
                  f"{res['children_cpu']:.1f} s children over {wall:.1f} s ({4 * reps} changes); "
                  f"last pass {res['last_apply'] * 1000:.0f} ms; VmHWM {res['hwm_mb']:.0f} MB", flush=True)
            print(f"                 {res['passes']} dataplane passes; mean ms per pass by driver: "
                  + ", ".join(f"{d} {v}" for d, v in res["drivers_ms"].items()), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoints", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--policies", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--cluster-policies", type=int, default=20, help="background ClusterNetworkPolicies")
    ap.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS", "10")))
    ap.add_argument("--probe-timeout", type=float, default=Probing.timeout, help="seconds a probe waits")
    ap.add_argument("--probe-interval", type=float, default=Probing.interval, help="seconds between probes")
    ap.add_argument("--dual-stack", type=int, nargs="*", default=[1000], metavar="ENDPOINTS",
                    help="endpoint counts of the dual-stack rows (probed over IPv6); none: no such row")
    args = ap.parse_args()
    probing = Probing(args.probe_timeout, args.probe_interval)
    if os.geteuid() != 0:
        print("bench_policy: needs root (network namespaces); skipped")
        return
    print(f"== policy: tortiectl apply/delete -> first probe that sees it (a probe every "
          f"{probing.interval * 1000:.0f} ms, each waiting {probing.timeout * 1000:.0f} ms)")
    all_results = []
    for n in args.endpoints:
        all_results += run(n, sorted(args.policies), args.reps, args.cluster_policies, probing)
    for n in args.dual_stack:
        all_results += run(n, sorted(args.policies), args.reps, args.cluster_policies, probing, dual=True)
    print("== summary (target: apply->enforced p50 under 1 s at 1000 endpoints)")
    for r in all_results:
        verdict = "ok" if r["allow_p50"] < 1.0 else "MISSED"
        print(f"   {r['endpoints']:5d} endpoints {r['policies']:4d} policies {r['cluster_policies']:3d} CNPs "
              f"{r['stack']:>28}: "
              f"p50 {r['allow_p50'] * 1000:5.0f} ms p99 {r['allow_p99'] * 1000:5.0f} ms; "
              f"CNP p50 {r['cnp']['allow_p50'] * 1000:5.0f} ms  [{verdict}]")


if __name__ == "__main__":
    main()
