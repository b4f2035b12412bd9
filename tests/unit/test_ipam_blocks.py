"""Block arithmetic of felix_agent.ipam.blocks (pure, table-driven)."""
import ipaddress

import pytest

from felix_agent.ipam import IPAMConfigError
from felix_agent.ipam.blocks import block_at, block_capacity, block_count, blocks_from, next_free, usable_range
from felix_agent.model import IPPool


@pytest.mark.parametrize("cidr,size,count,first,last", [
    ("10.65.0.0/24", 26, 4, "10.65.0.0/26", "10.65.0.192/26"),
    ("10.65.0.0/16", 26, 1024, "10.65.0.0/26", "10.65.255.192/26"),
    ("10.65.0.0/26", 26, 1, "10.65.0.0/26", "10.65.0.0/26"),
    ("10.65.0.0/30", 32, 4, "10.65.0.0/32", "10.65.0.3/32"),
    ("fd00:65::/120", 122, 4, "fd00:65::/122", "fd00:65::c0/122"),
])
def test_blocks_of_a_pool(cidr, size, count, first, last):
    pool = IPPool(name="p", cidr=cidr, block_size=size)
    assert block_count(pool) == count
    assert block_at(pool, 0) == first
    assert block_at(pool, count - 1) == last
    with pytest.raises(IndexError):
        block_at(pool, count)


def test_blocks_from_visits_every_block_once_with_a_per_node_start():
    pool = IPPool(name="p", cidr="10.65.0.0/22", block_size=26)
    a, b = list(blocks_from(pool, "node-a")), list(blocks_from(pool, "node-b"))
    assert sorted(a) == sorted(b) == sorted(block_at(pool, i) for i in range(16))
    assert len(set(a)) == 16
    assert a[0] != b[0]  # these two names hash to different starting blocks


@pytest.mark.parametrize("cidr,size,why", [
    ("10.65.0.1/24", 26, "not a valid network"),  # host bits set
    ("10.65.0.0/24", 20, "between /24"),  # block bigger than the pool
    ("10.65.0.0/24", 33, "between /24"),
    ("nonsense", 26, "not a valid network"),
])
def test_bad_pools_are_refused_clearly(cidr, size, why):
    with pytest.raises(IPAMConfigError, match=why):
        block_count(IPPool(name="bad", cidr=cidr, block_size=size))


@pytest.mark.parametrize("block,first,last,capacity", [
    ("10.65.0.0/26", "10.65.0.1", "10.65.0.62", 62),
    ("10.65.0.0/24", "10.65.0.1", "10.65.0.254", 254),
    ("10.65.0.4/31", "10.65.0.4", "10.65.0.5", 2),
    ("10.65.0.9/32", "10.65.0.9", "10.65.0.9", 1),
    ("fd00::/122", "fd00::1", "fd00::3e", 62),
])
def test_usable_range_skips_network_and_broadcast_like_edges(block, first, last, capacity):
    lo, hi = usable_range(block)
    assert str(ipaddress.ip_address(lo)) == first
    assert str(ipaddress.ip_address(hi)) == last
    assert block_capacity(block) == capacity


def test_next_free_is_round_robin_and_wraps():
    b = "10.65.0.0/29"  # usable .1 - .6
    assert next_free(b, set()) == "10.65.0.1"
    assert next_free(b, {"10.65.0.1"}, "10.65.0.1") == "10.65.0.2"
    # After .6 it wraps to the lowest free one, skipping used ones.
    assert next_free(b, {"10.65.0.1", "10.65.0.6"}, "10.65.0.6") == "10.65.0.2"
    # A just-freed .3 is not reused while others are free.
    assert next_free(b, {"10.65.0.1", "10.65.0.2"}, "10.65.0.3") == "10.65.0.4"
    full = {f"10.65.0.{i}" for i in range(1, 7)}
    assert next_free(b, full, "10.65.0.2") is None
    assert next_free("fd00::/126", {"fd00::1"}, "fd00::1") == "fd00::2"
