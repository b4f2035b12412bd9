"""The etcd key layout read backwards: the syncer keeps no key -> record map, so a deleted
key's record is found from the key alone (keys.record_key_of), for every kind."""
from __future__ import annotations

import pytest

from felix_agent.datastore import keys
from felix_agent.datastore.etcd.records import record_key
from felix_agent.model import (KIND_OF, BGPPeer, BlockAffinity, IPPool, LabelSelector, Namespace, NetworkPolicy, Node,
                               Pod, WorkloadEndpoint)

RECORDS = [Pod("ns-a", "web-1"), Namespace("ns-a"), Node("node.with.dots"), IPPool("p", "10.0.0.0/16"),
           BGPPeer("tor", "192.168.0.1", 65000), NetworkPolicy("ns-a", "deny", LabelSelector()),
           WorkloadEndpoint("node.with.dots", "ns-a", "web-1", "c1", "cali1", ("10.0.0.1",)),
           BlockAffinity("10.65.1.0/26", "n1"), BlockAffinity("fd00:1:2::/122", "n1")]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("prefix", ["/tortie", "/a/b"])
def test_the_record_key_comes_back_from_the_etcd_key(rec, prefix):
    kind = KIND_OF[type(rec)]
    key = record_key(prefix, rec)
    assert keys.kind_of_key(prefix, key) == kind
    assert keys.record_key_of(prefix, kind, key) == rec.key
