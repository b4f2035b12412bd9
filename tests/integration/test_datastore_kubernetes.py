"""The Kubernetes datastore against the stand-in kube-apiserver (tests/fakes/apiserver.py),
which replays the real v1.28 recordings in tests/fixtures/k8s-api: paginated lists, the four
watch streams with their bookmarks, 410 Gone for a list, a continue token and a watch,
401 and 403. The syncer talks to it through the official client and a kubeconfig.
No root needed; everything is on loopback."""
from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import pytest

from felix_agent import model
from felix_agent.datastore.base import Backoff
from felix_agent.datastore.kubernetes import KubernetesSyncer
from tests.fakes.apiserver import FakeAPIServer, read_recorded
from tests.fakes.recorder import running

FAST = Backoff(initial=0.05, maximum=0.5)
P1_TOKEN = json.loads(read_recorded("pods-page1.json"))["metadata"]["continue"]
P2_TOKEN = json.loads(read_recorded("pods-page2.json"))["metadata"]["continue"]


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture
def api():
    with FakeAPIServer(token="secret") as a:
        yield a


def _get(url, token="secret"):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("query,status,body", [
    ("/api/v1/pods", 200, "pods.json"),
    ("/api/v1/namespaces", 200, "namespaces.json"),
    ("/api/v1/nodes", 200, "nodes.json"),
    ("/apis/networking.k8s.io/v1/networkpolicies", 200, "networkpolicies.json"),
    ("/api/v1/pods?limit=4", 200, "pods-page1.json"),
    (f"/api/v1/pods?limit=4&continue={P1_TOKEN}", 200, "pods-page2.json"),
    (f"/api/v1/pods?limit=4&continue={P2_TOKEN}", 200, "pods-page3.json"),
    ("/api/v1/pods?resourceVersion=1&resourceVersionMatch=Exact", 410, "gone-410.json"),
    ("/api/v1/namespaces/x/pods/missing", 404, "notfound-404.json"),
    ("/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion=1", 200, "gone-410-watch.ndjson"),
    ("/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion=367&timeoutSeconds=80", 200,
     "pods-watch.ndjson"),
    ("/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion=367&timeoutSeconds=80", 200,
     "nodes-watch.ndjson"),
])
def test_fake_serves_recorded_bodies_byte_for_byte(api, query, status, body):
    assert _get(api.url + query) == (status, read_recorded(body))


def test_fake_answers_401_for_a_wrong_token(api):
    assert _get(api.url + "/api/v1/pods", token="not-a-valid-token") == (401, read_recorded("unauthorized-401.json"))
    api.forbidden.add("pods")
    assert _get(api.url + "/api/v1/pods") == (403, read_recorded("forbidden-403.json"))


def _syncer(api, tmp_path, **kw):
    kc = api.kubeconfig(str(tmp_path / "kubeconfig"), token=kw.pop("token", None))
    return KubernetesSyncer(kubeconfig=kc, backoff=FAST, watch_timeout=30, **kw)


def test_recorded_lists_pages_and_watch_streams(api, tmp_path):
    """page_size=4 walks the recorded pod pages with their continue tokens; then the four
    recorded watch streams play: pod x/d from Pending to Running (IP 10.244.9.11) to a
    label change to Failed (no IPs for policy) to deleted; node-b with its podCIDR block,
    then deleted with it; namespace w created and deleted; y relabelled; policy
    x/watch-demo created, patched and deleted. Bookmarks move the resourceVersion on."""
    async def body():
        syncer = _syncer(api, tmp_path, page_size=4)
        async with running(syncer) as rec:
            await rec.wait_in_sync()
            await rec.wait(lambda: api.count(lambda p, q: p == "/api/v1/pods" and q.get("resourceVersion") == "409"),
                           what="pods re-watch from the bookmark's resourceVersion")
            await rec.wait(lambda: api.count(lambda p, q: p == "/api/v1/nodes" and q.get("resourceVersion") == "427"),
                           what="nodes re-watch")
            await rec.wait(lambda: dict(rec.state[("Namespace", "y")].labels).get("team") == "bb", what="y")
            await rec.wait(lambda: api.count(lambda p, q: p.endswith("networkpolicies") and q.get("resourceVersion") == "402"),
                           what="policies re-watch")
            await rec.settle(0.3)
        pod_reqs = [q for p, q in api.requests if p == "/api/v1/pods" and "watch" not in q]
        assert pod_reqs == [{"limit": "4"}, {"limit": "4", "continue": P1_TOKEN},
                            {"limit": "4", "continue": P2_TOKEN}]
        d = [e.value for e in rec.events if isinstance(e, model.Update) and e.key == "x/d" and e.kind == "Pod"]
        assert d[0].node == "" and d[0].ips == ()
        assert any(p and p.ips == ("10.244.9.11",) and p.labels == (("pod", "d"),) for p in d)
        assert any(p and p.ips == ("10.244.9.11",) and p.labels == (("pod", "e"),) for p in d)
        assert d[-2].ips == ()  # Failed: exit 137, no IPs for policy
        assert d[-1] is None
        # Unchanged-for-the-model MODIFIED events (status churn) were not re-emitted.
        assert len(d) == 6
        nb = [(e.kind, e.value) for e in rec.events if isinstance(e, model.Update)
              and (e.key == "node-b" or e.key == "10.244.1.0/24")]
        assert nb[0][1].pod_cidrs == () and nb[1][1].pod_cidrs == ("10.244.1.0/24",)
        assert ("BlockAffinity", model.BlockAffinity("10.244.1.0/24", "node-b")) in nb
        assert nb[-2:] in ([("Node", None), ("BlockAffinity", None)], [("BlockAffinity", None), ("Node", None)])
        assert ("BlockAffinity", "10.244.0.0/24") in rec.state  # vm's block from the list
        assert ("Namespace", "w") not in rec.state
        assert dict(rec.state[("Namespace", "y")].labels)["env"] == "test"
        wd = [e.value for e in rec.events if isinstance(e, model.Update) and e.key == "x/watch-demo"]
        assert len(wd) == 3 and wd[-1] is None
        assert wd[1].ingress[0].ports[1] == model.PolicyPort("UDP", "serve-80-udp")
        assert [e for e in rec.events if isinstance(e, model.SyncStatus)] == [model.SyncStatus(True)]
    run(body())


def test_expired_continue_token_restarts_the_list(api, tmp_path):
    async def body():
        api.next_continue_gone("pods")
        syncer = _syncer(api, tmp_path, page_size=4)
        async with running(syncer) as rec:
            await rec.wait_in_sync()
            assert len(rec.keys("Pod")) == 9
        pod_lists = [q for p, q in api.requests if p == "/api/v1/pods" and "watch" not in q]
        # page 1, the 410 on page 2, then the whole list again from page 1
        assert pod_lists[:4] == [{"limit": "4"}, {"limit": "4", "continue": P1_TOKEN},
                                 {"limit": "4"}, {"limit": "4", "continue": P1_TOKEN}]
        assert syncer.lists["Pod"] == 1
    run(body())


def test_list_410_and_watch_410_relist_without_churn(api, tmp_path):
    async def body():
        api.next_list_gone("pods")
        syncer = _syncer(api, tmp_path)
        async with running(syncer) as rec:
            await rec.wait_in_sync()
            await rec.wait(lambda: ("Pod", "x/d") in rec.state or api.count(
                lambda p, q: p == "/api/v1/pods" and q.get("resourceVersion") == "409"), what="replay")
            await rec.wait(lambda: api.count(lambda p, q: p == "/api/v1/pods" and q.get("resourceVersion") == "409"),
                           what="re-watch")
            await rec.settle(0.3)
            m = rec.mark()
            lists_before = syncer.lists["Pod"]
            api.next_watch_gone("pods")
            api.drop_watches()
            await rec.wait(lambda: syncer.lists["Pod"] == lists_before + 1, what="relist after ERROR 410")
            await rec.settle(0.3)
            assert rec.since(m) == []  # nothing changed: no events at all
    run(body())


def test_401_is_logged_and_retried_until_the_token_works(api, tmp_path, caplog):
    async def body():
        api.token = "rotated"
        syncer = _syncer(api, tmp_path, token="old-token")
        with caplog.at_level(logging.ERROR):
            async with running(syncer) as rec:
                await rec.wait(lambda: rec.statuses_since(0), what="SyncStatus(False)")
                st = rec.statuses_since(0)[0]
                assert not st.in_sync and "401" in st.reason and "credentials were rejected" in st.reason
                await asyncio.sleep(0.5)
                assert api.count(lambda p, q: True) > 4  # it keeps retrying (with backoff)
                api.token = "old-token"  # the server accepts it again
                await rec.wait_in_sync()
                assert len(rec.keys("Pod")) == 9
        assert "kubernetes API refused" in caplog.text and "HTTP 401 Unauthorized" in caplog.text
    run(body())


def test_403_names_the_missing_permission(api, tmp_path, caplog):
    async def body():
        api.forbidden.add("networkpolicies")
        syncer = _syncer(api, tmp_path)
        with caplog.at_level(logging.ERROR):
            async with running(syncer) as rec:
                await rec.wait(lambda: rec.statuses_since(0), what="SyncStatus(False)")
                st = rec.statuses_since(0)[0]
                assert "403" in st.reason and "needs list and watch on networkpolicies" in st.reason
                # The other resources are listed meanwhile, but the syncer is not in sync
                # without policies (pods would run unprotected).
                await rec.wait(lambda: len(rec.keys("Pod")) == 9, what="pods")
                assert not any(s.in_sync for s in rec.statuses_since(0))
                api.forbidden.clear()
                await rec.wait_in_sync()
                assert len(rec.keys("NetworkPolicy")) == 11
        assert "forbidden" in caplog.text
    run(body())


def test_missing_network_policy_api_crds_are_said_once_and_do_not_stop_the_sync(api, tmp_path, caplog):
    """The stand-in API server has no policy.networking.k8s.io resources (404, as a cluster
    without the CRDs answers): the agent syncs all the same, says so once in the log and in
    `notes` (tortiectl status), and keeps looking (a CRD installed later is picked up)."""
    async def body():
        syncer = _syncer(api, tmp_path, absent_recheck=0.05)
        with caplog.at_level(logging.INFO, logger="felix_agent.datastore.kubernetes"):
            async with running(syncer) as rec:
                await rec.wait_in_sync()
                await rec.wait(lambda: syncer.lists["ClusterNetworkPolicy"] >= 4, what="rechecks")
                assert len(rec.keys("Pod")) == 9
        assert sorted(syncer.notes) == sorted(model.CLUSTER_POLICY_KINDS)
        assert "clusternetworkpolicies.policy.networking.k8s.io is not installed" in syncer.notes["ClusterNetworkPolicy"]
        said = [r for r in caplog.records if "clusternetworkpolicies.policy.networking.k8s.io" in r.getMessage()]
        assert len(said) == 1
        asked = {p for p, _ in api.requests if p.startswith("/apis/policy.networking.k8s.io/")}
        assert asked == {"/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
                         "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies",
                         "/apis/policy.networking.k8s.io/v1alpha1/baselineadminnetworkpolicies"}
    run(body())


def test_cluster_policies_are_listed_and_watched_once_their_crds_exist(api, tmp_path):
    """Installing the CRDs later is picked up at the next look; then objects are listed,
    watched (a change and a delete arrive as events), and an invalid one is skipped."""
    cnp = {"metadata": {"name": "guard"},
           "spec": {"tier": "Admin", "priority": 5, "subject": {"namespaces": {}},
                    "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"ns": "y"}}}]}]}}

    async def body():
        syncer = _syncer(api, tmp_path, absent_recheck=0.05)
        async with running(syncer) as rec:
            await rec.wait_in_sync()
            assert "ClusterNetworkPolicy" in syncer.notes
            api.install_crd("clusternetworkpolicies")
            api.upsert("clusternetworkpolicies", cnp)
            await rec.wait(lambda: ("ClusterNetworkPolicy", "guard") in rec.state, what="the CNP listed")
            assert "ClusterNetworkPolicy" not in syncer.notes and "AdminNetworkPolicy" in syncer.notes
            assert rec.state[("ClusterNetworkPolicy", "guard")].ingress[0].action == "Deny"
            api.upsert("clusternetworkpolicies", {**cnp, "spec": {**cnp["spec"], "priority": 7}})
            await rec.wait(lambda: rec.state[("ClusterNetworkPolicy", "guard")].priority == 7, what="the change")
            api.upsert("clusternetworkpolicies", {"metadata": {"name": "bad"}, "spec": {**cnp["spec"], "priority": 5000}})
            api.remove("clusternetworkpolicies", "guard")
            await rec.wait(lambda: ("ClusterNetworkPolicy", "guard") not in rec.state, what="the delete")
            assert ("ClusterNetworkPolicy", "bad") not in rec.state  # priority out of range: skipped
    run(body())
