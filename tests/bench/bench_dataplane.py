"""Dataplane driver figures: iptables (both backends), ipsets and routes, in one lab
namespace.  A plain script (`make bench` runs it); it prints figures and asserts nothing
about speed.  Needs root; everything lives in a throw-away lab namespace.

    .venv/bin/python tests/bench/bench_dataplane.py [--chains 1000] [--rules-per-chain 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from felix_agent.calc.desired import Hook, IpSet, Route  # noqa: E402
from felix_agent.dataplane.ipsets import IpsetDriver  # noqa: E402
from felix_agent.dataplane.iptables import IptablesTable  # noqa: E402
from felix_agent.dataplane.routes import RouteDriver  # noqa: E402
from tests.lab import Lab, new_prefix  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000


def chains_for(n_chains: int, per_chain: int, variant: int = 0) -> dict[str, tuple[str, ...]]:
    chains = {}
    for c in range(n_chains):
        rules = tuple(f"-s 10.{c // 250}.{c % 250}.{r} -p tcp --dport {1000 + r} -j RETURN" for r in range(per_chain))
        chains[f"cali-b{c:04d}"] = rules
    # A dispatch chain hooked from INPUT jumps to every other chain.
    chains["cali-INPUT"] = tuple(f"-j cali-b{c:04d}" for c in range(n_chains))
    if variant:
        name = f"cali-b{n_chains // 2:04d}"
        rules = list(chains[name])
        rules[per_chain // 2] = f"-s 192.0.2.{variant} -j DROP"
        chains[name] = tuple(rules)
    return chains


def bench_iptables(ns: str, backend: str, n_chains: int, per_chain: int) -> None:
    t = IptablesTable("filter", backend, netns=ns)
    hooks = [Hook("filter", "INPUT", "cali-INPUT")]
    total = n_chains * per_chain + n_chains
    t.set_desired(chains_for(n_chains, per_chain), hooks)
    ch, ms = timed(t.apply)
    print(f"iptables {backend:6s} initial apply: {total} rules / {n_chains + 1} chains: {ms:8.1f} ms "
          f"({ch.batch_lines} restore lines)")
    ch, ms = timed(t.apply)
    assert not ch
    print(f"iptables {backend:6s} no-op apply (save + parse + diff):             {ms:8.1f} ms")
    t.set_desired(chains_for(n_chains, per_chain, variant=1), hooks)
    ch, ms = timed(t.apply)
    print(f"iptables {backend:6s} one-rule change: {ch.rules_replaced} replaced, "
          f"{ch.rules_inserted} inserted, {ch.rules_deleted} deleted:    {ms:8.1f} ms")
    t.set_desired({}, [])
    ch, ms = timed(t.apply)
    print(f"iptables {backend:6s} remove everything ({len(ch.chains_deleted)} chains):             {ms:8.1f} ms")


def bench_ipsets(ns: str, n: int) -> None:
    d = IpsetDriver(netns=ns)
    members = frozenset(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(n))
    s = IpSet("cali40s:bench", members, type="hash:ip")
    d.set_desired({s.name: s})
    ch, ms = timed(d.apply_updates)
    print(f"ipset  initial restore of {n} members:                       {ms:8.1f} ms")
    ch, ms = timed(d.apply_updates)
    assert not ch
    print(f"ipset  no-op apply (save + parse + diff):                      {ms:8.1f} ms")
    d.set_desired({s.name: IpSet(s.name, members | {"192.0.2.1"}, type="hash:ip")})
    ch, ms = timed(d.apply_updates)
    print(f"ipset  one-member change ({ch.members_added} added):                           {ms:8.1f} ms")
    d.set_desired({})
    ch, ms = timed(d.apply_deletions)
    print(f"ipset  destroy the set:                                        {ms:8.1f} ms")


def bench_routes(ns: str, n: int) -> None:
    d = RouteDriver(netns=ns)
    routes = frozenset(Route(f"10.{100 + i // 1024}.{(i // 4) % 256}.{(i % 4) * 64}/26", dev="eth0",
                             gateway="192.168.100.12", onlink=True) for i in range(n))
    d.set_desired(routes)
    ch, ms = timed(d.apply)
    print(f"routes initial apply of {len(ch.added)} routes:                           {ms:8.1f} ms")
    ch, ms = timed(d.apply)
    assert not ch
    print(f"routes no-op apply (dump + diff):                              {ms:8.1f} ms")
    d.set_desired(routes | {Route("10.99.0.0/26", type="blackhole")})
    ch, ms = timed(d.apply)
    print(f"routes one-route change:                                       {ms:8.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=1000)
    ap.add_argument("--rules-per-chain", type=int, default=10)
    ap.add_argument("--members", type=int, default=10000)
    ap.add_argument("--routes", type=int, default=1000)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_dataplane: needs root (network namespaces)")
    with Lab(prefix=new_prefix("tb")) as lab:
        lab.build(1)
        ns = lab.nodes[0].ns
        print(f"== dataplane drivers in lab namespace {ns}")
        for backend in ("nft", "legacy"):
            bench_iptables(ns, backend, a.chains, a.rules_per_chain)
        bench_ipsets(ns, a.members)
        bench_routes(ns, a.routes)


if __name__ == "__main__":
    main()
