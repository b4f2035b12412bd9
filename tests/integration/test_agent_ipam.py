"""The agent's IPAM through the real stack: the built CNI binary (dist/tortie, `ipam.type:
tortie`) talking to real agents on lab nodes, blocks claimed in a real etcd, BIRD routes.

1. 100 concurrent ADDs across two nodes, one agent killed with SIGKILL while its ADDs are in
   flight and started again: failed ADDs say "try again" (CNI code 11) and succeed when
   retried, no address is handed out twice or lost, and every node's IPAM lists exactly the
   pods that exist.
2. Two agents claiming blocks of one small pool at the same time, round after round: no
   block has two owners, full blocks make a node claim another, and an exhausted pool is a
   clear CNI error that leaves nothing behind.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import pytest

from tests.lab.cluster import VENV_BIN, LabCluster, LabPod, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root

TRY_AGAIN = 11


# --- helpers: many pods at once ------------------------------------------------------

@dataclass
class Attempt:
    """One CNI ADD through the real binary and what it answered."""

    node: str
    namespace: str
    pod: str
    ns: str  # the pod's network namespace
    container_id: str
    proc: subprocess.CompletedProcess | None = None

    @property
    def ok(self) -> bool:
        return self.proc is not None and self.proc.returncode == 0

    @property
    def answer(self) -> dict:
        return json.loads(self.proc.stdout) if self.proc and self.proc.stdout.strip() else {}

    def lab_pod(self) -> LabPod:
        res = self.answer
        ip = next(i["address"].split("/")[0] for i in res["ips"])
        iface = next(i["name"] for i in res["interfaces"] if i["name"].startswith("cali"))
        return LabPod(self.namespace, self.pod, self.node, self.ns, ip, self.container_id, iface, res)


def pod_namespaces(c: LabCluster, names: list[str]) -> list[str]:
    """Create pod network namespaces in parallel: 100 of them one by one take seconds."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(c.lab.add_pod_ns, names))


def run_adds(c: LabCluster, attempts: list[Attempt], workers: int | None = None) -> list:
    """Start every ADD at once (one thread each); returns the futures."""
    pool = ThreadPoolExecutor(max_workers=workers or len(attempts))

    def one(a: Attempt) -> Attempt:
        a.proc = c.cni_run(a.node, "ADD", a.container_id, f"/var/run/netns/{a.ns}", a.namespace, a.pod)
        return a
    futures = [pool.submit(one, a) for a in attempts]
    pool.shutdown(wait=False)
    return futures


def run_dels(c: LabCluster, pods: list[LabPod]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(pods)))) as pool:
        return list(pool.map(lambda p: c.cni_run(p.node, "DEL", p.container_id, f"/var/run/netns/{p.ns}",
                                                 p.namespace, p.name), pods))


def etcd_get(c: LabCluster, prefix: str) -> dict[str, bytes]:
    """Every key under `prefix` in the lab's etcd, read with etcdctl (not through tortie)."""
    p = subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", "get", "--prefix", prefix, "-w", "json"],
                       capture_output=True, text=True, env={**os.environ, "ETCDCTL_API": "3"}, timeout=30)
    assert p.returncode == 0, p.stderr
    kvs = json.loads(p.stdout).get("kvs") or []
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]) for kv in kvs}


def affinities(c: LabCluster) -> dict[str, str]:
    """block cidr -> owning node, from the BlockAffinity keys in etcd."""
    out = {}
    for key, value in etcd_get(c, "/tortie/blockaffinities/").items():
        spec = json.loads(value)["spec"]
        assert key.endswith("/" + spec["cidr"].replace("/", "-")), f"{key} holds {spec}"
        out[spec["cidr"]] = spec["node"]
    return out


def cali_links(c: LabCluster, node: str) -> set[str]:
    out = sh("ip", "-o", "link", "show", ns=c.lab.node(node).ns).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if line.split(":")[1].strip().startswith("cali")}


def in_blocks(ip: str, blocks) -> bool:
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(b) for b in blocks)


def unreachable(c: LabCluster, src: LabPod, ips: list[str]) -> list[str]:
    """The addresses `src` cannot ping (one shell in its namespace, all pings in parallel)."""
    script = ('for ip in "$@"; do (ping -n -q -c1 -W2 "$ip" >/dev/null 2>&1 || echo "$ip") & done; wait')
    return sh("sh", "-c", script, "sh", *ips, ns=src.ns, timeout=60).stdout.split()


def ipam_view(c: LabCluster, node: str) -> dict:
    """`tortiectl ipam show -o json` run inside the node, where it reads the agent's /status."""
    p = sh(os.path.join(VENV_BIN, "tortiectl"), "ipam", "show", "-o", "json", ns=c.lab.node(node).ns)
    return json.loads(p.stdout)


def assert_node_state(c: LabCluster, node: str, pods: list[LabPod]) -> None:
    """The node's agent (status endpoints and IPAM) and kernel list exactly `pods`."""
    mine = {p.container_id: p for p in pods if p.node == node}
    st = c.status(node)
    allocs = {a["container_id"]: a["ip"] for a in st["ipam"]["allocation_list"]}
    assert allocs == {cid: p.ip for cid, p in mine.items()}, f"{node}: IPAM differs from the pods"
    assert st["ipam"]["leaks"] == 0
    assert {e["container_id"] for e in st["endpoints"]} == set(mine), f"{node}: endpoints differ"
    assert {e["iface"] for e in st["endpoints"]} == {p.iface for p in mine.values()}
    assert cali_links(c, node) == {p.iface for p in mine.values()}, f"{node}: cali links differ"
    blocks = [b["cidr"] for b in st["ipam"]["blocks"]]
    owned = {cidr for cidr, n in affinities(c).items() if n == node}
    assert set(blocks) == owned, f"{node}: local blocks {blocks} vs etcd {owned}"
    for p in mine.values():
        assert in_blocks(p.ip, owned), f"{p.key} has {p.ip}, outside {node}'s blocks {sorted(owned)}"
    # The agent's publisher writes endpoints behind the ADDs and DELs (they do not wait
    # for etcd), so the datastore follows within moments.
    wait_for(lambda: len(etcd_get(c, f"/tortie/workloadendpoints/{node}/")) == len(mine), timeout=10,
             what=f"{node}: as many endpoints in etcd as pods ({len(mine)})")


# --- 1. concurrency and a killed agent ------------------------------------------------

N_PODS = 100


def test_hundred_concurrent_adds_survive_agent_kill(make_cluster):
    """100 ADDs at once over two nodes (blocks of /27, so each node claims several while
    serving them).  Once node2's agent has answered a few, it gets SIGKILL with the rest in
    flight; it is started again and every failed ADD is retried the two ways a runtime does:
    the same ADD again, or DEL of the failed sandbox then ADD of a new one."""
    c = make_cluster(2, pool="", start=False)
    c.apply_pool("10.65.0.0/16", block_size=27)
    c.start_agents()

    t0 = time.monotonic()
    names = [f"p{i:03d}" for i in range(N_PODS)]
    nss = pod_namespaces(c, names)
    attempts = [Attempt(node=f"node{1 + i % 2}", namespace="load", pod=name, ns=ns,
                        container_id=f"c-{name}-{os.urandom(3).hex()}")
                for i, (name, ns) in enumerate(zip(names, nss))]
    print(f"\n{N_PODS} pod namespaces in {time.monotonic() - t0:.2f}s")

    t0 = time.monotonic()
    futures = run_adds(c, attempts)
    on_node2 = [f for f, a in zip(futures, attempts) if a.node == "node2"]
    state_file = os.path.join(c.node_dir(c.lab.node("node2")), "state", "ipam", "state.json")

    def in_agent() -> int:
        """ADDs node2's agent has allocated for (on disk) but not yet answered."""
        try:
            with open(state_file) as f:
                allocated = len(json.load(f)["allocations"])
        except (OSError, ValueError):
            return 0
        answered = sum(1 for f in on_node2 if f.done())
        return allocated - answered if answered >= 5 else 0
    # Kill once the agent is half-way through several ADDs (address on disk, no answer yet);
    # on a machine so loaded that requests trickle in one by one, when most are answered.
    wait_for(lambda: in_agent() >= 3 or sum(f.done() for f in on_node2) >= 40, timeout=120, interval=0.005,
             what="node2 to be busy with several ADDs")
    half_done = in_agent()
    c.stop_agent("node2", sig=signal.SIGKILL)
    print(f"node2 killed with {half_done} ADDs half-done inside it")
    wait(futures)
    took = time.monotonic() - t0
    failed = [a for a in attempts if not a.ok]
    print(f"first pass: {N_PODS - len(failed)} ADDs ok, {len(failed)} failed (node2 killed) in {took:.2f}s")
    assert failed, "node2's agent answered everything before it was killed: nothing was in flight"
    assert all(a.node == "node2" for a in failed), "ADDs on node1 failed though its agent ran"
    for a in failed:
        assert a.proc.returncode != 0
        err = a.answer
        assert err.get("code") == TRY_AGAIN and err.get("msg"), f"{a.pod}: not a 'try again' error: {a.proc.stdout}"
    before = {a.container_id: a.lab_pod() for a in attempts if a.ok}
    assert len({p.ip for p in before.values()}) == len(before)

    c.start_agent("node2")
    # Retry: even ones repeat the same ADD; odd ones are torn down (DEL) and re-created as a
    # new sandbox, which frees whatever the killed ADD had allocated or wired.
    retries = []
    for k, a in enumerate(failed):
        if k % 2:
            p = c.cni_run(a.node, "DEL", a.container_id, f"/var/run/netns/{a.ns}", a.namespace, a.pod)
            assert p.returncode == 0, f"DEL of failed {a.pod}: {p.stdout} {p.stderr}"
            a = Attempt(a.node, a.namespace, a.pod, a.ns, f"c-{a.pod}-{os.urandom(3).hex()}")
        else:
            a = Attempt(a.node, a.namespace, a.pod, a.ns, a.container_id)
        retries.append(a)
    wait(run_adds(c, retries))
    bad = [(a.pod, a.proc.stdout) for a in retries if not a.ok]
    assert not bad, f"retried ADDs failed: {bad[:3]}"

    pods = list(before.values()) + [a.lab_pod() for a in retries]
    for p in pods:
        c.pods[p.key] = p
    assert len(pods) == N_PODS
    assert len({p.ip for p in pods}) == N_PODS, "an address was handed out twice"
    # nothing lost: every address answered before the kill is still allocated to its pod
    for node in ("node1", "node2"):
        allocs = {a["container_id"]: a["ip"] for a in c.status(node)["ipam"]["allocation_list"]}
        for cid, p in before.items():
            if p.node == node:
                assert allocs.get(cid) == p.ip, f"{p.key}'s {p.ip} was lost across the restart"
        assert_node_state(c, node, pods)
    view = ipam_view(c, "node2")
    assert {a["container_id"] for a in view["allocation_list"]} == {p.container_id for p in pods
                                                                    if p.node == "node2"}
    assert len(set(affinities(c))) == len(affinities(c))

    # every pod reachable, across nodes and on the same node
    src1 = next(p for p in pods if p.node == "node1")
    src2 = next(p for p in pods if p.node == "node2")
    targets = [p.ip for p in pods]
    wait_for(lambda: not unreachable(c, src1, targets), timeout=60, what="node1's pod to reach all 100 pods")
    assert not unreachable(c, src2, targets)

    t0 = time.monotonic()
    dels = run_dels(c, pods)
    assert all(p.returncode == 0 for p in dels), [p.stdout for p in dels if p.returncode][:3]
    print(f"{N_PODS} DELs in {time.monotonic() - t0:.2f}s")
    c.pods.clear()
    for node in ("node1", "node2"):
        wait_for(lambda: not c.status(node)["endpoints"], what=f"{node} to drop every endpoint")
        assert_node_state(c, node, [])


# --- 2. two nodes claiming blocks of one small pool ------------------------------------

SMALL_POOL, SMALL_BLOCK = "10.66.0.0/26", 29  # 8 blocks of 6 usable addresses: 48 pods fill it
PER_ROUND = 8  # per node and round: three rounds fill every block exactly


def assert_blocks_consistent(c: LabCluster, pods: list[LabPod]) -> dict[str, str]:
    """One owner per block (etcd, each agent's IPAM, the routes) and every pod inside its
    own node's blocks; returns block -> node."""
    owners = affinities(c)
    local = {n: {b["cidr"] for b in c.status(n)["ipam"]["blocks"]} for n in ("node1", "node2")}
    assert not local["node1"] & local["node2"], f"a block is used by both nodes: {local}"
    for n, blocks in local.items():
        assert blocks == {b for b, o in owners.items() if o == n}, f"{n}: {blocks} vs etcd {owners}"
    for p in pods:
        assert owners.get(str(ipaddress.ip_network(f"{p.ip}/{SMALL_BLOCK}", strict=False))) == p.node, \
            f"{p.key} ({p.ip}) is outside {p.node}'s blocks"
    # Each node routes exactly the other's blocks to it (learnt over BGP from BIRD), and
    # none of its own: a block with two owners would show up here as a route to a block
    # this node also serves.
    for n, other, other_ip in (("node1", "node2", "192.168.100.12"), ("node2", "node1", "192.168.100.11")):
        def routed(n=n, other=other, other_ip=other_ip):
            bird = {line.split()[0] for line in c.routes(n).splitlines() if "proto bird" in line}
            return bird == local[other] and all(f"{b} via {other_ip}" in c.routes(n) for b in bird)
        wait_for(routed, timeout=30, what=f"{n}'s BGP routes to be exactly {other}'s blocks")
    return owners


def test_block_claims_race_and_pool_exhaustion(make_cluster):
    """Both agents fill one 8-block pool round by round, at the same time: blocks are
    claimed with etcd transactions, so none can end up with two owners, and the pool's end
    is a CNI error naming the pool."""
    c = make_cluster(2, pool="", start=False)
    c.apply_pool(SMALL_POOL, block_size=SMALL_BLOCK, name="tiny")
    c.start_agents()
    pods: list[LabPod] = []
    seen_blocks: dict[str, int] = {}
    for rnd in range(3):
        names = [f"r{rnd}-{n}-{i}" for n in (1, 2) for i in range(PER_ROUND)]
        nss = pod_namespaces(c, names)
        attempts = [Attempt(f"node{name.split('-')[1]}", "fill", name, ns, f"c-{name}-{os.urandom(3).hex()}")
                    for name, ns in zip(names, nss)]
        wait(run_adds(c, attempts))
        bad = [(a.pod, a.proc.stdout) for a in attempts if not a.ok]
        assert not bad, f"round {rnd}: {bad[:3]}"
        pods += [a.lab_pod() for a in attempts]
        assert len({p.ip for p in pods}) == len(pods), "an address was handed out twice"
        owners = assert_blocks_consistent(c, pods)
        for n in ("node1", "node2"):
            count = sum(1 for o in owners.values() if o == n)
            # a node claims a block only when its others are full: 6 addresses each
            assert count == -(-PER_ROUND * (rnd + 1) // 6), f"round {rnd}: {n} holds {count} blocks"
            assert count >= seen_blocks.get(n, 0)
            seen_blocks[n] = count
    assert len(affinities(c)) == 8
    lost = sum(c.agent_log(n).count("was claimed by another node") for n in ("node1", "node2"))
    print(f"\n8 blocks claimed by 2 nodes over 3 rounds; {lost} claims lost to the other node (etcd CAS)")

    # The pool is full: one more ADD fails cleanly on either node.
    for n in ("node1", "node2"):
        before_links = cali_links(c, n)
        ns = pod_namespaces(c, [f"over-{n}"])[0]
        a = Attempt(n, "fill", f"over-{n}", ns, f"c-over-{n}")
        wait(run_adds(c, [a]))
        assert a.proc.returncode != 0
        err = a.answer
        assert err.get("code") == TRY_AGAIN, a.proc.stdout
        assert "tiny" in err["msg"] and "exhausted" in err["msg"], err
        assert cali_links(c, n) == before_links
        assert "eth0" not in sh("ip", "-o", "link", "show", ns=ns).stdout
        st = c.status(n)
        assert "c-over-" + n not in {x["container_id"] for x in st["ipam"]["allocation_list"]}
        assert not etcd_get(c, f"/tortie/workloadendpoints/{n}/fill/over-{n}")
    for n in ("node1", "node2"):
        assert_node_state(c, n, pods)

    for p in pods:
        c.pods[p.key] = p
    dels = run_dels(c, pods)
    assert all(p.returncode == 0 for p in dels)
    c.pods.clear()
    for n in ("node1", "node2"):
        assert_node_state(c, n, [])
