"""pytest fixtures for the netns lab.

- `lab_prefix`: this test session's unique prefix; every namespace made carries it.
- `make_lab(n, two_subnets=False)`: builds a Lab; torn down after the test, pass or fail.
- `etcd`: a real etcd on a free loopback port, fresh per test.
Tests that need root are marked `root`; without root they skip with that reason.
"""
from __future__ import annotations

import pytest

from tests.lab.etcd import Etcd
from tests.lab.netns import Lab, delete_namespaces, new_prefix
from tests.lab.tools import is_root, missing_tools

_SESSION_PREFIX = new_prefix()
_counter = iter(range(1, 1_000_000))


def pytest_collection_modifyitems(config, items):
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab_prefix():
    yield _SESSION_PREFIX
    # Safety net: whatever a crashed fixture left behind under this run's prefix.
    delete_namespaces(_SESSION_PREFIX)


@pytest.fixture
def make_lab(lab_prefix):
    labs: list[Lab] = []

    def factory(n_nodes: int = 3, two_subnets: bool = False, ipv6: bool = False, ipv4: bool = True) -> Lab:
        missing = missing_tools(["ip", "ss", "ping"])
        if missing:
            pytest.fail("lab tools missing: " + ", ".join(missing))
        lab = Lab(prefix=f"{lab_prefix}-{next(_counter)}")
        labs.append(lab)
        return lab.build(n_nodes, two_subnets=two_subnets, ipv6=ipv6, ipv4=ipv4)

    yield factory
    for lab in labs:
        lab.teardown()


@pytest.fixture
def etcd():
    with Etcd() as e:
        yield e


@pytest.fixture
def make_cluster(make_lab, tmp_path):
    """make_cluster(n_nodes, two_subnets=False, pool="10.65.0.0/16", mode="bgp",
    cross_subnet=False, start=True, pool6="", **LabCluster kwargs) -> a LabCluster with real etcd,
    agents (started unless start=False) and the real CNI plugin; torn down after the test
    (agents, BIRD, pods, namespaces, etcd and its data).  pool6: an IPv6 pool (same mode)
    next to `pool` (dual-stack) or instead of it (pool=""): the nodes get IPv6 addresses;
    ipv4_nodes=False: and no IPv4 ones (an IPv6-only underlay)."""
    from tests.lab.cluster import LabCluster

    etcds: list[Etcd] = []

    def factory(n_nodes: int = 2, two_subnets: bool = False, pool: str = "10.65.0.0/16", mode: str = "bgp",
                cross_subnet: bool = False, start: bool = True, pool6: str = "", ipv4_nodes: bool = True,
                **kw) -> LabCluster:
        e = Etcd()
        etcds.append(e)
        e.start()
        lab = make_lab(n_nodes, two_subnets=two_subnets, ipv6=bool(pool6), ipv4=ipv4_nodes)
        c = LabCluster(lab, e, str(tmp_path / f"cluster{len(etcds)}"), **kw)
        if pool:
            c.apply_pool(pool, mode=mode, cross_subnet=cross_subnet)
        if pool6:
            c.apply_pool(pool6, mode=mode, cross_subnet=cross_subnet, name="pool6")
        if start:
            c.start_agents()
        return c

    yield factory
    for e in etcds:
        e.close()
