"""Cluster: the model index and the Pod x WorkloadEndpoint join."""
import pytest

from felix_agent.calc.cluster import FLOATING_IPS_ANNOTATION, Cluster
from felix_agent.model import (
    Endpoint,
    IPPool,
    NamedPort,
    Namespace,
    Node,
    Pod,
    SyncStatus,
    Update,
    WorkloadEndpoint,
)
from tests.unit.test_calc_fixtures import cluster_of, delete, iface_of, pod, upd


def test_apply_reports_changed_kinds_and_noops():
    c = Cluster()
    ns = Namespace("a", (("team", "x"),))
    assert c.apply(upd(ns)) == {"Namespace"}
    assert c.apply(upd(ns)) == set()  # same value: nothing changed
    assert c.apply(upd(Namespace("a", (("team", "y"),)))) == {"Namespace"}
    assert c.apply(delete(ns)) == {"Namespace"}
    assert c.apply(delete(ns)) == set()  # unknown key
    assert c.apply(SyncStatus(True)) == set()
    assert dict(c.namespaces) == {}


@pytest.mark.parametrize("update, message", [
    (Update("Gadget", "x", None), "unknown kind"),
    (Update("Pod", "a/b", Namespace("a")), "carries a Namespace"),
    (Update("Pod", "a/other", Pod("a", "b")), "differs from the record's key"),
])
def test_bad_updates_are_refused_and_change_nothing(update, message):
    c = cluster_of(Pod("a", "b", ips=("10.0.0.1",)))
    before = c.endpoints()
    with pytest.raises(ValueError, match=message):
        c.apply(update)
    assert c.endpoints() == before and list(c.pods) == ["a/b"]


def test_every_kind_is_held():
    recs = [IPPool("p", "10.0.0.0/16"), Node("n1", "192.168.1.1/24"), Namespace("a")]
    c = cluster_of(*recs)
    assert list(c.pools) == ["p"] and list(c.nodes) == ["n1"] and list(c.namespaces) == ["a"]
    with pytest.raises(TypeError):
        c.pools["q"] = IPPool("q", "10.1.0.0/16")  # read-only views


def test_join_takes_network_from_wep_and_identity_from_pod():
    p = Pod("a", "web", labels=(("app", "web"),), node="n1", ips=("10.0.0.9",),
            ports=(NamedPort("http", 8080),),
            annotations=((FLOATING_IPS_ANNOTATION, '["172.16.0.1"]'),))
    w = WorkloadEndpoint("a", "web", "n1", "cid", iface_of("a", "web"), ("10.0.0.5",))
    (ep,) = cluster_of(p, w).endpoints()
    assert ep == Endpoint("a", "web", "n1", ("10.0.0.5",), (("app", "web"),), iface_of("a", "web"),
                          (NamedPort("http", 8080),), ("172.16.0.1",))


@pytest.mark.parametrize("records, expected", [
    # pod without WEP (kubernetes mode before/without CNI ADD here): pod's IPs, no iface
    ([Pod("a", "p", node="n2", ips=("10.0.0.1",))], [("a/p", "n2", ("10.0.0.1",), "")]),
    # WEP without pod (etcd mode before tortiectl applied the pod): no labels
    ([WorkloadEndpoint("a", "p", "n1", "c", "caliabc", ("10.0.0.2",))], [("a/p", "n1", ("10.0.0.2",), "caliabc")]),
    # WEP with no IPs yet: the pod's IPs
    ([Pod("a", "p", node="n1", ips=("10.0.0.3",)), WorkloadEndpoint("a", "p", "n1", "c", "caliabc", ())],
     [("a/p", "n1", ("10.0.0.3",), "caliabc")]),
    # host-network pods are not endpoints
    ([Pod("a", "h", node="n1", ips=("192.168.1.1",), host_network=True)], []),
    # a stale WEP on the old node loses against the one on the pod's node
    ([Pod("a", "p", node="n2", ips=("10.0.0.4",)),
      WorkloadEndpoint("a", "p", "n1", "old", "caliold", ("10.0.0.1",)),
      WorkloadEndpoint("a", "p", "n2", "new", "calinew", ("10.0.0.4",))],
     [("a/p", "n2", ("10.0.0.4",), "calinew")]),
])
def test_join_cases(records, expected):
    got = [(e.key, e.node, e.ips, e.iface) for e in cluster_of(*records).endpoints()]
    assert got == expected


def test_delete_pod_keeps_wep_endpoint_and_delete_both_removes_it():
    recs = pod("a", "p", "10.0.0.1", labels={"app": "x"})
    c = cluster_of(recs)
    c.apply(delete(recs[0]))
    (ep,) = c.endpoints()
    assert ep.labels == () and ep.iface == iface_of("a", "p")
    c.apply(delete(recs[1]))
    assert c.endpoints() == ()


def test_join_is_incremental():
    """Unrelated endpoints are not rebuilt: the very same objects come back."""
    c = cluster_of(pod("a", "p1", "10.0.0.1"), pod("a", "p2", "10.0.0.2"))
    first = {e.key: e for e in c.endpoints()}
    c.apply(upd(Pod("a", "p2", labels=(("v", "2"),), node="n1", ips=("10.0.0.2",))))
    second = {e.key: e for e in c.endpoints()}
    assert second["a/p1"] is first["a/p1"]
    assert second["a/p2"].labels == (("v", "2"),)
    assert c.endpoints() is c.endpoints()  # cached while nothing changes


@pytest.mark.parametrize("annotation, fips, problem", [
    ('["1.2.3.4", "1.2.3.5"]', ("1.2.3.4", "1.2.3.5"), ""),
    ("[]", (), ""),
    ("not json", (), "is not JSON"),
    ('{"a": 1}', (), "must be a JSON list of strings"),
    ("[1]", (), "must be a JSON list of strings"),
])
def test_floating_ip_annotation(annotation, fips, problem):
    c = cluster_of(Pod("a", "p", ips=("10.0.0.1",), annotations=((FLOATING_IPS_ANNOTATION, annotation),)))
    assert c.endpoints()[0].floating_ips == fips
    problems = c.problems()
    assert (problem in problems[0]) if problem else problems == []
