"""IPAM against a real etcd: block claims are etcd transactions, so two nodes racing for
blocks of one small pool never share a block or an address.  No root needed (etcd runs
on loopback; nothing touches the network)."""
import asyncio

import pytest

from felix_agent.datastore.etcd import EtcdStore
from felix_agent.datastore.keys import object_key
from felix_agent.ipam import IPAM, EtcdBackend, IPAMExhausted
from felix_agent.model import IPPool

SMALL = IPPool(name="small", cidr="10.96.0.0/24", block_size=28)  # 16 blocks x 14 addresses


class BlindBackend(EtcdBackend):
    """Sees no existing claims, so every block it wants goes through etcd's create-only
    transaction: the race is decided by etcd alone, not by a listing done before."""

    async def list_affinities(self):
        return []


async def node(name, etcd, state_dir, prefix="/tortie", blind=False, **kw):
    store = EtcdStore("127.0.0.1", etcd.port, prefix=prefix)
    ipam = IPAM(name, (BlindBackend if blind else EtcdBackend)(store), str(state_dir), **kw)
    await ipam.start()
    return ipam, store


async def fill(ipam, tag, burst=8):
    """Allocate in concurrent bursts until the pool is exhausted; returns the addresses."""
    got, i = [], 0
    while True:
        res = await asyncio.gather(*(ipam.allocate(f"{tag}-{i + k}") for k in range(burst)),
                                   return_exceptions=True)
        i += burst
        for r in res:
            if isinstance(r, IPAMExhausted):
                continue
            if isinstance(r, BaseException):
                raise r
            got.append(r)
        if any(isinstance(r, IPAMExhausted) for r in res):
            return got


def test_two_nodes_race_for_blocks_and_never_overlap(etcd, tmp_path):
    async def body():
        for rnd in range(12):
            prefix = f"/race{rnd}"
            setup = EtcdStore("127.0.0.1", etcd.port, prefix=prefix)
            await setup.put_record(SMALL)
            blind = rnd % 2 == 1  # odd rounds: both nodes claim blind
            a, sa = await node("node-a", etcd, tmp_path / f"{rnd}a", prefix, blind)
            b, sb = await node("node-b", etcd, tmp_path / f"{rnd}b", prefix, blind)
            got_a, got_b = await asyncio.gather(fill(a, "a"), fill(b, "b"))
            ips_a, ips_b = {x.ip for x in got_a}, {x.ip for x in got_b}
            blocks_a, blocks_b = {x.cidr for x in a.blocks()}, {x.cidr for x in b.blocks()}
            assert not ips_a & ips_b, f"round {rnd}: an address was handed out twice"
            assert not blocks_a & blocks_b, f"round {rnd}: a block has two owners"
            assert len(blocks_a | blocks_b) == 16 and len(ips_a | ips_b) == 16 * 14
            assert all(x.block in blocks_a for x in got_a) and all(x.block in blocks_b for x in got_b)
            # etcd agrees with what each node believes it owns.
            in_etcd = {x.cidr: x.node for x in await setup.get_all("BlockAffinity")}
            assert in_etcd == {**{c: "node-a" for c in blocks_a}, **{c: "node-b" for c in blocks_b}}
            for ipam, store in ((a, sa), (b, sb)):
                await ipam.close()
                await store.close()
            await setup.close()
    asyncio.run(body())


def test_full_block_claims_a_second_and_exhaustion_is_clear(etcd, tmp_path):
    async def body():
        admin = EtcdStore("127.0.0.1", etcd.port)
        await admin.put_record(IPPool(name="tiny", cidr="10.97.0.0/27", block_size=28))  # 2 x 14
        ipam, store = await node("node1", etcd, tmp_path)
        first = [await ipam.allocate(f"c{i}") for i in range(14)]
        assert len({a.block for a in first}) == 1
        assert len(await admin.get_all("BlockAffinity")) == 1
        second = await ipam.allocate("c14")
        assert second.block != first[0].block
        key = object_key("/tortie", "BlockAffinity", second.block)
        assert await admin.get_value(key) is not None  # the claim is in etcd
        for i in range(15, 28):
            await ipam.allocate(f"c{i}")
        with pytest.raises(IPAMExhausted, match=r"IP pool\(s\) tiny exhausted"):
            await ipam.allocate("c28")
        assert len(ipam.allocations()) == 28
        await ipam.close()
        # A restart with an empty state dir learns both blocks from etcd, claims nothing.
        again, store2 = await node("node1", etcd, tmp_path / "fresh")
        assert {b.cidr for b in again.blocks()} == {first[0].block, second.block}
        await again.close()
        for s in (store, store2, admin):
            await s.close()
    asyncio.run(body())


def test_empty_block_is_given_back_only_by_its_owner(etcd, tmp_path):
    async def body():
        admin = EtcdStore("127.0.0.1", etcd.port)
        await admin.put_record(IPPool(name="tiny", cidr="10.98.0.0/27", block_size=28))
        a, sa = await node("node-a", etcd, tmp_path / "a", release_empty_blocks=True)
        for i in range(15):
            await a.allocate(f"c{i}")
        second = a.allocations_for("c14")[0].block
        await a.release("c14")
        assert {x.cidr for x in await admin.get_all("BlockAffinity")} == {a.allocations_for("c0")[0].block}
        # node-b can now claim the returned block.
        b, sb = await node("node-b", etcd, tmp_path / "b")
        assert (await b.allocate("b0")).block == second
        # A stale release by node-a must not delete node-b's claim (compare-and-delete).
        from felix_agent.model import BlockAffinity
        assert not await EtcdBackend(sa).unclaim(BlockAffinity(cidr=second, node="node-a", pool="tiny"))
        assert {x.cidr: x.node for x in await admin.get_all("BlockAffinity")}[second] == "node-b"
        for x in (a, b):
            await x.close()
        for s in (sa, sb, admin):
            await s.close()
    asyncio.run(body())


def test_etcd_down_at_start_still_serves_known_blocks(etcd, tmp_path):
    async def body():
        admin = EtcdStore("127.0.0.1", etcd.port)
        await admin.put_record(SMALL)
        ipam, store = await node("node1", etcd, tmp_path)
        await ipam.allocate("c0")
        await ipam.close()
        await store.close()
        await admin.close()
        etcd.stop()
        again, store2 = await node("node1", etcd, tmp_path)  # logs a warning, does not fail
        assert (await again.allocate("c1")).block == again.allocations_for("c0")[0].block
        await again.close()
        await store2.close()
    asyncio.run(body())
