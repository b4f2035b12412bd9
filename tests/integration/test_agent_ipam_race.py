"""IPAM's refresh racing its own block claims (no root, no etcd: a backend that holds the
affinity list back while the node claims a block).  Found by the two-node block test in
test_agent_ipam.py: a node with a block claimed a moment ago treated it as taken away and
claimed yet another one."""
from __future__ import annotations

import asyncio

import pytest

from felix_agent.ipam import IPAM
from felix_agent.model import BlockAffinity, IPPool

POOL = IPPool(name="tiny", cidr="10.66.0.0/26", block_size=29)  # 8 blocks of 6 addresses


class HeldListBackend:
    """Claims as etcd does them (create if absent); list_affinities can be made to return a
    snapshot taken before it was held back, like a list answered just before a claim."""

    claims_blocks = True

    def __init__(self) -> None:
        self.affs: dict[str, BlockAffinity] = {}
        self.hold: asyncio.Event | None = None
        self.listed = asyncio.Event()

    async def list_pools(self):
        return [POOL]

    async def list_affinities(self):
        snapshot = list(self.affs.values())
        hold, self.hold = self.hold, None  # only the next list is held back
        self.listed.set()
        if hold is not None:
            await hold.wait()
        return snapshot

    async def claim(self, aff: BlockAffinity) -> bool:
        if aff.cidr in self.affs:
            return False
        self.affs[aff.cidr] = aff
        return True

    async def unclaim(self, aff: BlockAffinity) -> bool:
        return self.affs.pop(aff.cidr, None) is not None


@pytest.mark.timeout(30)
def test_block_claimed_during_refresh_stays_usable(tmp_path):
    async def scenario():
        backend = HeldListBackend()
        ipam = IPAM("node1", backend, str(tmp_path))
        await ipam.start()
        ipam.set_pools([POOL])
        await ipam.allocate("c0")
        assert len(backend.affs) == 1
        # A refresh reads the affinity list; before its answer is used, the node fills its
        # block and claims a second one.
        hold = backend.hold = asyncio.Event()
        backend.listed = asyncio.Event()
        refresh = asyncio.create_task(ipam.refresh())
        await backend.listed.wait()
        for i in range(1, 7):
            await ipam.allocate(f"c{i}")
        assert len(backend.affs) == 2
        hold.set()
        await refresh
        # The second block has room for five more; none of them may claim a third block.
        for i in range(7, 12):
            a = await ipam.allocate(f"c{i}")
            assert a.block in backend.affs
        assert len(backend.affs) == 2, f"claimed {sorted(backend.affs)} for 12 addresses"
        assert {b.cidr for b in ipam.show().blocks if b.usable} == set(backend.affs)
        await ipam.close()

    asyncio.run(scenario())
