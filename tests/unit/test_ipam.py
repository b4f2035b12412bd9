"""IPAM without a datastore: allocation, exhaustion, persistence, release, GC, show().

The datastore side is an in-memory backend here (tests/unit cannot run etcd); the real
etcd claims are tested in tests/integration/test_ipam_etcd.py."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from felix_agent.ipam import (IPAM, IPAMConfigError, IPAMError, IPAMExhausted, NoUsablePool,
                              PodCIDRBackend, StateDirInUse)
from felix_agent.ipam.state import StateFile
from felix_agent.model import BlockAffinity, IPPool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MemoryBackend:
    """Pools and affinities in a dict; claim is create-if-absent like the etcd one."""

    claims_blocks = True

    def __init__(self, pools=()):
        self.pools = list(pools)
        self.affinities: dict[str, BlockAffinity] = {}
        self.claims = 0

    async def list_pools(self):
        return list(self.pools)

    async def list_affinities(self):
        return list(self.affinities.values())

    async def claim(self, aff):
        self.claims += 1
        if aff.cidr in self.affinities:
            return False
        self.affinities[aff.cidr] = aff
        return True

    async def unclaim(self, aff):
        if self.affinities.get(aff.cidr, None) and self.affinities[aff.cidr].node == aff.node:
            del self.affinities[aff.cidr]
            return True
        return False


def run(coro):
    return asyncio.run(coro)


POOL = IPPool(name="pool-a", cidr="10.65.0.0/25", block_size=26)  # two blocks of 62


async def started(node, backend, state_dir, **kw):
    ipam = IPAM(node, backend, str(state_dir), **kw)
    await ipam.start()
    return ipam


def test_first_allocation_claims_a_block_then_fills_it_then_claims_another(tmp_path):
    async def body():
        be = MemoryBackend([POOL])
        ipam = await started("node1", be, tmp_path)
        first = await ipam.allocate("c0", namespace="ns", pod="p0")
        assert len(be.affinities) == 1
        block = first.block
        assert be.affinities[block].node == "node1" and be.affinities[block].pool == "pool-a"
        ips = [first.ip] + [(await ipam.allocate(f"c{i}")).ip for i in range(1, 62)]
        assert len(set(ips)) == 62 and len(be.affinities) == 1  # one block, all of it
        assert all(a.block == block for a in ipam.allocations())
        nxt = await ipam.allocate("c62")
        assert nxt.block != block and len(be.affinities) == 2
        await ipam.close()
    run(body())


def test_same_attachment_gets_the_same_address_and_other_ifname_another(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        a = await ipam.allocate("c1", "eth0")
        assert (await ipam.allocate("c1", "eth0")) == a
        b = await ipam.allocate("c1", "net1")
        assert b.ip != a.ip
        assert {x.ifname for x in ipam.allocations_for("c1")} == {"eth0", "net1"}
        await ipam.close()
    run(body())


def test_exhausted_pool_raises_a_clear_error_and_changes_nothing(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        for i in range(124):
            await ipam.allocate(f"c{i}")
        before = ipam.allocations()
        with pytest.raises(IPAMExhausted, match=r"pool-a exhausted"):
            await ipam.allocate("one-too-many")
        assert ipam.allocations() == before
        assert not ipam.allocations_for("one-too-many")
        assert ipam.status() == (True, "")  # claiming is not ruled out without asking the datastore
        await ipam.close()
    run(body())


def test_blocks_of_another_node_are_never_used(tmp_path):
    async def body():
        be = MemoryBackend([POOL])
        a = await started("node-a", be, tmp_path / "a")
        b = await started("node-b", be, tmp_path / "b")
        ips_a = {(await a.allocate(f"a{i}")).ip for i in range(62)}
        ips_b = {(await b.allocate(f"b{i}")).ip for i in range(62)}
        assert not ips_a & ips_b
        assert {x.node for x in be.affinities.values()} == {"node-a", "node-b"}
        with pytest.raises(IPAMExhausted):
            await a.allocate("a-more")
        await a.close(), await b.close()
    run(body())


def test_concurrent_allocations_are_distinct(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        allocs = await asyncio.gather(*(ipam.allocate(f"c{i}") for i in range(100)))
        assert len({a.ip for a in allocs}) == 100
        await ipam.close()
    run(body())


def test_disabled_pool_gives_no_new_blocks_and_no_new_addresses(tmp_path):
    async def body():
        be = MemoryBackend([POOL])
        ipam = await started("node1", be, tmp_path)
        held = await ipam.allocate("c1")
        be.pools = [IPPool(name="pool-a", cidr=POOL.cidr, block_size=26, disabled=True)]
        await ipam.refresh()
        with pytest.raises(NoUsablePool, match="no enabled IPv4 IP pool"):
            await ipam.allocate("c2")
        assert ipam.status()[0] is False
        assert ipam.allocations_for("c1") == [held]  # existing addresses stay
        # A second, enabled pool takes over.
        be.pools.append(IPPool(name="pool-b", cidr="10.66.0.0/24", block_size=26))
        assert (await ipam.allocate("c2")).ip.startswith("10.66.0.")
        await ipam.close()
    run(body())


def test_pools_fed_by_the_agent_are_used_too(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([]), tmp_path)
        with pytest.raises(NoUsablePool):
            await ipam.allocate("c1")
        ipam.set_pools([IPPool(name="default-pool", cidr="10.70.0.0/24"),
                        IPPool(name="broken", cidr="10.71.0.1/24")])  # bad one is skipped
        assert [p.name for p in ipam.pools] == ["default-pool"]
        assert (await ipam.allocate("c1")).ip.startswith("10.70.0.")
        await ipam.close()
    run(body())


def test_allocations_survive_a_restart_and_are_not_handed_out_again(tmp_path):
    async def body():
        be = MemoryBackend([POOL])
        ipam = await started("node1", be, tmp_path)
        held = {(await ipam.allocate(f"c{i}", namespace="ns", pod=f"p{i}")).ip for i in range(10)}
        await ipam.close()
        again = await started("node1", be, tmp_path)
        assert {a.ip for a in again.allocations()} == held
        assert again.allocations_for("c3")[0].pod == "p3"
        fresh = {(await again.allocate(f"n{i}")).ip for i in range(50)}
        assert not fresh & held
        await again.close()
    run(body())


def test_state_dir_cannot_be_used_twice(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        with pytest.raises(StateDirInUse, match="in use"):
            await started("node1", MemoryBackend([POOL]), tmp_path)
        await ipam.close()
        other = await started("node1", MemoryBackend([POOL]), tmp_path)  # free again
        await other.close()
    run(body())


def test_unreadable_or_foreign_state_file_refuses_to_start(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(IPAMError, match="unreadable"):
        run(started("node1", MemoryBackend([POOL]), tmp_path))
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "node": "other"}))
    with pytest.raises(IPAMError, match="belongs to node 'other'"):
        run(started("node1", MemoryBackend([POOL]), tmp_path))


def test_state_file_is_written_atomically_before_the_address_is_returned(tmp_path, monkeypatch):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        a = await ipam.allocate("c1")
        on_disk = json.loads((tmp_path / "state.json").read_text())
        assert [x["ip"] for x in on_disk["allocations"]] == [a.ip]
        assert not [n for n in os.listdir(tmp_path) if ".tmp." in n]
        # A failed write means no allocation: nothing in memory either.
        def boom(self, data):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(StateFile, "save", boom)
        with pytest.raises(OSError):
            await ipam.allocate("c2")
        assert not ipam.allocations_for("c2")
        with pytest.raises(OSError):
            await ipam.release("c1")
        assert ipam.allocations_for("c1")  # not released when the release was not saved
        await ipam.close()
    run(body())


CHILD = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from felix_agent.ipam import IPAM, PodCIDRBackend
    async def main():
        ipam = IPAM("node1", PodCIDRBackend("node1", ["10.80.0.0/24"]), {state!r})
        await ipam.start()
        i = 0
        while True:
            a = await ipam.allocate(f"c{{i}}")
            print(a.ip, flush=True)  # printed only after allocate() returned
            i += 1
    asyncio.run(main())
""")


def test_kill_minus_9_loses_no_allocation(tmp_path):
    """A child process allocates in a loop; SIGKILL at an arbitrary point. Every address
    it reported is in the state a new instance loads, and none is handed out again."""
    state = str(tmp_path / "state")
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT, state=state)],
                         stdout=subprocess.PIPE, text=True)
    reported = []
    try:
        for _ in range(40):
            reported.append(p.stdout.readline().strip())
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    async def body():
        ipam = await started("node1", PodCIDRBackend("node1", ["10.80.0.0/24"]), state)
        held = {a.ip for a in ipam.allocations()}
        assert set(reported) <= held  # at most the in-flight one more than reported
        assert len(held) - len(reported) <= 1
        fresh = {(await ipam.allocate(f"new{i}")).ip for i in range(100)}
        assert not fresh & held
        await ipam.close()
    run(body())


def test_release_is_idempotent_and_freed_address_is_not_reused_at_once(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        a = await ipam.allocate("c1")
        await ipam.allocate("c2")
        assert [x.ip for x in await ipam.release("c1")] == [a.ip]
        assert await ipam.release("c1") == []
        assert await ipam.release("never-existed") == []
        nxt = await ipam.allocate("c3")
        assert nxt.ip != a.ip
        await ipam.close()
    run(body())


def test_gc_frees_leaks_and_keeps_valid_attachments(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        for cid in ("keep", "leak1", "leak2"):
            await ipam.allocate(cid)
        await ipam.allocate("pair", "eth0")
        await ipam.allocate("pair", "net1")
        freed = await ipam.gc(["keep", ("pair", "eth0")])
        assert sorted((a.container_id, a.ifname) for a in freed) == [
            ("leak1", "eth0"), ("leak2", "eth0"), ("pair", "net1")]
        assert sorted(a.attachment for a in ipam.allocations()) == [("keep", "eth0"), ("pair", "eth0")]
        assert await ipam.gc(["keep", ("pair", "eth0")]) == []
        await ipam.close()
        # The GC's result is persisted too.
        again = await started("node1", MemoryBackend([POOL]), tmp_path)
        assert len(again.allocations()) == 2
        await again.close()
    run(body())


def test_show_reports_blocks_allocations_and_leaks(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        a = await ipam.allocate("c1", namespace="ns", pod="p1")
        b = await ipam.allocate("gone")
        rep = ipam.show(known_container_ids={"c1"})
        assert rep.node == "node1"
        assert [(x.cidr, x.pool, x.capacity, x.used, x.usable) for x in rep.blocks] == [
            (a.block, "pool-a", 62, 2, True)]
        assert {x.ip for x in rep.allocations} == {a.ip, b.ip}
        assert [x.container_id for x in rep.leaks] == ["gone"]
        assert ipam.show().leaks == ()  # unknown liveness: no leak claims
        await ipam.close()
    run(body())


def test_release_empty_blocks_gives_back_all_but_one(tmp_path):
    async def body():
        be = MemoryBackend([POOL])
        ipam = await started("node1", be, tmp_path, release_empty_blocks=True)
        for i in range(63):
            await ipam.allocate(f"c{i}")
        assert len(be.affinities) == 2
        second = ipam.allocations_for("c62")[0].block
        await ipam.release("c62")
        assert second not in be.affinities and len(be.affinities) == 1
        assert [b.cidr for b in ipam.blocks()] == [ipam.allocations_for("c0")[0].block]
        for i in range(62):
            await ipam.release(f"c{i}")
        assert len(be.affinities) == 1  # the last block stays
        await ipam.close()
    run(body())


def test_restart_learns_its_blocks_from_the_datastore(tmp_path):
    async def body():
        be = MemoryBackend([POOL])
        ipam = await started("node1", be, tmp_path / "one")
        a = await ipam.allocate("c1")
        await ipam.close()
        # A fresh state dir (say the disk was replaced): the block comes from the datastore
        # and is reused rather than claiming another.
        fresh = await started("node1", be, tmp_path / "two")
        assert [b.cidr for b in fresh.blocks()] == [a.block]
        assert (await fresh.allocate("c2")).block == a.block
        assert len(be.affinities) == 1
        await fresh.close()
    run(body())


def test_kubernetes_mode_uses_pod_cidrs_and_never_claims(tmp_path):
    async def body():
        be = PodCIDRBackend("node1", ["10.244.1.0/29"])  # six usable addresses
        ipam = await started("node1", be, tmp_path)
        ips = [(await ipam.allocate(f"c{i}")).ip for i in range(6)]
        assert ips == [f"10.244.1.{i}" for i in range(1, 7)]
        with pytest.raises(IPAMExhausted, match=r"podCIDRs 10.244.1.0/29 are exhausted"):
            await ipam.allocate("c6")
        assert ipam.status() == (False, "node node1's podCIDRs 10.244.1.0/29 are full")
        await ipam.close()
        empty = await started("node2", PodCIDRBackend("node2", []), tmp_path / "n2")
        with pytest.raises(NoUsablePool, match="no podCIDR"):
            await empty.allocate("c1")
        assert empty.status()[0] is False
        await empty.close()
    with pytest.raises(IPAMConfigError, match="podCIDR"):
        PodCIDRBackend("node1", ["10.244.1.1/24"])
    run(body())


def test_bad_arguments_are_refused(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([POOL]), tmp_path)
        with pytest.raises(IPAMConfigError):
            await ipam.allocate("")
        with pytest.raises(IPAMConfigError):
            await ipam.allocate("c1", "")
        assert ipam.allocations() == []
        await ipam.close()
    run(body())
    with pytest.raises(IPAMConfigError):
        IPAM("", MemoryBackend(), str(tmp_path))



def test_refresh_from_the_models_claims_reads_no_claims_and_keeps_one_not_yet_echoed(tmp_path):
    """The agent hands refresh() its model's BlockAffinities (the watch keeps them current)
    instead of a read of every claim: a block this node claimed a moment ago, whose watch
    event has not arrived, stays its own; one the model shows another node holding does not
    get new addresses."""
    class Counting(MemoryBackend):
        reads = 0

        async def list_affinities(self):
            self.reads += 1
            return await super().list_affinities()

    async def body():
        be = Counting([POOL])
        ipam = await started("node1", be, tmp_path)
        ipam.set_pools([POOL])
        block = (await ipam.allocate("c0")).block
        reads = be.reads
        await ipam.refresh([])  # the model has not seen the claim yet
        assert be.reads == reads
        assert (await ipam.allocate("c1")).block == block  # still its own block
        await ipam.refresh([BlockAffinity(block, "node1", "pool-a")])  # echoed: seen
        await ipam.refresh([BlockAffinity(block, "node2", "pool-a")])  # taken over, says the model
        assert be.reads == reads
        assert (await ipam.allocate("c2")).block != block  # no new addresses from it
    run(body())
