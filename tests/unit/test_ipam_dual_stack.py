"""IPAM for dual-stack and IPv6-only clusters: one address of each family in one ADD,
IPv6 blocks claimed from IPv6 pools, podCIDRs of both families (kubernetes mode), all
or nothing, and release of both."""
import pytest

from felix_agent.ipam import IPAM, NoUsablePool, PodCIDRBackend
from felix_agent.model import IPPool
from tests.unit.test_ipam import MemoryBackend, run, started

V4 = IPPool(name="pool-v4", cidr="10.65.0.0/24", block_size=26)
V6 = IPPool(name="pool-v6", cidr="fd00:10:65::/120", block_size=122)


def test_dual_stack_pools_give_one_address_of_each_family(tmp_path):
    async def body():
        be = MemoryBackend([V4, V6])
        ipam = await started("node1", be, tmp_path)
        assert ipam.families() == (4, 6)
        got = await ipam.allocate_families("c1", namespace="ns", pod="p")
        assert [a.ip.count(":") > 0 for a in got] == [False, True]
        assert got[0].block.startswith("10.65.0.") and got[0].block.endswith("/26")
        assert got[1].block.startswith("fd00:10:65::") and got[1].block.endswith("/122")
        assert {a.cidr for a in be.affinities.values()} == {got[0].block, got[1].block}
        # a retried ADD gets the same two addresses, not new ones
        assert await ipam.allocate_families("c1", namespace="ns", pod="p") == got
        gone = await ipam.release("c1", "eth0")
        assert sorted(a.ip for a in gone) == sorted(a.ip for a in got)
        assert ipam.allocations() == []
        await ipam.close()
    run(body())


def test_ipv6_only_pool_gives_ipv6_only(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([V6]), tmp_path)
        assert ipam.families() == (6,)
        got = await ipam.allocate_families("c1")
        assert len(got) == 1 and got[0].ip.startswith("fd00:10:65::")
        assert ipam.status() == (True, "")
        await ipam.close()
    run(body())


def test_one_family_failing_releases_the_other(tmp_path):
    """An exhausted IPv6 pool: the ADD fails and keeps no IPv4 address either."""
    async def body():
        tiny6 = IPPool(name="pool-v6", cidr="fd00:10:65::/126", block_size=126)  # 2 usable
        ipam = await started("node1", MemoryBackend([V4, tiny6]), tmp_path)
        await ipam.allocate_families("c1")
        await ipam.allocate_families("c2")
        with pytest.raises(Exception, match="exhausted"):
            await ipam.allocate_families("c3")
        assert not ipam.allocations_for("c3")
        await ipam.close()
    run(body())


def test_podcidrs_of_both_families(tmp_path):
    async def body():
        be = PodCIDRBackend("node1", ["10.244.1.0/24", "fd00:244:1::/64"])
        ipam = IPAM("node1", be, str(tmp_path))
        await ipam.start()
        assert ipam.families() == (4, 6)
        got = await ipam.allocate_families("c1")
        assert got[0].ip.startswith("10.244.1.") and got[1].ip.startswith("fd00:244:1::")
        await ipam.close()
    run(body())


def test_no_pool_at_all_names_ipv4(tmp_path):
    async def body():
        ipam = await started("node1", MemoryBackend([]), tmp_path)
        with pytest.raises(NoUsablePool, match="no enabled IPv4 IP pool"):
            await ipam.allocate_families("c1")
        await ipam.close()
    run(body())
