"""Policy calc speed: 1000 endpoints x 200 policies -> DesiredState (prints figures)."""
import sys, time, statistics
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root when in tests/bench/
from felix_agent.calc.cluster import Cluster
from felix_agent.calc.filter import CalcConfig, dataplane_state
from felix_agent.calc.policy import policy_chains
from felix_agent.model import *

def up(r): return Update(KIND_OF[type(r)], r.key, r)

def build(n_eps=1000, n_pols=200, n_nodes=10, local_all=False):
    c = Cluster()
    for i in range(20):
        c.apply(up(Namespace(f"ns{i}", (("team", f"t{i % 5}"),))))
    for i in range(n_eps):
        ns, node = f"ns{i % 20}", ("n0" if local_all else f"n{i % n_nodes}")
        ip = f"10.{64 + i // 65000}.{(i // 250) % 256}.{i % 250 + 1}"
        c.apply(up(Pod(ns, f"p{i}", labels=(("app", f"a{i % 50}"), ("ver", f"v{i % 3}")), node=node,
                       ips=(ip,), ports=(NamedPort("http", 8000 + i % 7),))))
        c.apply(up(WorkloadEndpoint(ns, f"p{i}", node, f"c{i}", f"cali{i:011x}", (ip,))))
    for j in range(n_pols):
        ns = f"ns{j % 20}"
        r1 = PolicyRule(peers=(PolicyPeer(pod_selector=LabelSelector((("app", f"a{(j + 1) % 50}"),))),
                               PolicyPeer(pod_selector=LabelSelector((("ver", "v1"),)),
                                          namespace_selector=LabelSelector((("team", f"t{j % 5}"),)))),
                        ports=(PolicyPort("TCP", 80), PolicyPort("TCP", "http")))
        r2 = PolicyRule(peers=(PolicyPeer(ip_block=IPBlock("10.0.0.0/8", ("10.64.0.0/16",))),))
        c.apply(up(NetworkPolicy(ns, f"pol{j}", LabelSelector((("app", f"a{j % 50}"),)), ingress=(r1, r2),
                                 egress=(r1,), policy_types=("Ingress", "Egress"))))
    return c

def timed(f, n=5):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); out = f(); ts.append(time.perf_counter() - t)
    return out, min(ts), statistics.median(ts)

for local_all in (False, True):
    t0 = time.perf_counter(); c = build(local_all=local_all); t_build = time.perf_counter() - t0
    policy_chains.cache_clear()
    cfg = CalcConfig("n0")
    t = time.perf_counter(); st = dataplane_state(c, cfg); cold = time.perf_counter() - t
    st, best, med = timed(lambda: dataplane_state(c, cfg))
    rules = sum(len(r) for tbl in st.chains.values() for r in tbl.values())
    local = sum(1 for e in c.endpoints() if e.node == "n0")
    print(f"1000 endpoints ({local} on this node) x 200 policies: cold {cold*1000:.0f} ms, "
          f"warm best {best*1000:.0f} ms / median {med*1000:.0f} ms; "
          f"{sum(len(t) for t in st.chains.values())} chains, {rules} rules, {len(st.ipsets)} ipsets, "
          f"{sum(len(s.members) for s in st.ipsets.values())} members (model load {t_build*1000:.0f} ms)")
    # one label change then recompute
    p = c.pods["ns1/p1"]
    from dataclasses import replace
    t = time.perf_counter(); c.apply(up(replace(p, labels=(("app", "a9"),)))); dataplane_state(c, cfg)
    print(f"  label change + recompute: {(time.perf_counter() - t)*1000:.0f} ms")
