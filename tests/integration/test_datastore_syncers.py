"""Event sequences every Syncer backend must produce identically, for the same history.

- etcd: a real etcd (tests.lab.Etcd) holding the recorded cluster as tortie's JSON.
- kubernetes: the stand-in kube-apiserver (tests/fakes/apiserver.py) serving the recorded
  v1.28 objects as live state (no recorded-watch replay here, so every change in these
  tests is the test's own), through the official client and a kubeconfig.
- fanout: the same stand-in watched by a real tortie-fanout process, the agent's
  FanoutSyncer connected to it over loopback TCP: what an agent gets through the fan-out
  must be what it gets from the API directly.
Both start from the recorded cluster: 7 namespaces, 1 node (+ its podCIDR block),
9 pods, 11 network policies. Neither backend needs root; nothing leaves loopback.
"""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from felix_agent import model
from felix_agent.datastore.convert import from_k8s, to_k8s
from felix_agent.datastore.base import Backoff
from felix_agent.datastore.etcd import EtcdStore, EtcdSyncer
from felix_agent.datastore.fanout.client import FanoutSyncer
from felix_agent.datastore.kubernetes import KubernetesSyncer, records_of
from tests.fakes.apiserver import DATA_DIR, FakeAPIServer
from tests.fakes.recorder import running
from tests.lab import Etcd
from tests.lab.fanout import Fanout

FAST = Backoff(initial=0.05, maximum=0.5)
PLURAL = {"Pod": "pods", "Namespace": "namespaces", "Node": "nodes", "NetworkPolicy": "networkpolicies"}


def recorded_records() -> dict[tuple[str, str], model.Record]:
    out = {}
    for name in ("namespaces.json", "nodes.json", "pods.json", "networkpolicies.json"):
        with open(os.path.join(DATA_DIR, name)) as f:
            d = json.load(f)
        kind = d["kind"][:-4]
        for item in d["items"]:
            out.update(records_of(kind, from_k8s(item, kind)))
    return out


class EtcdBackend:
    name = "etcd"
    expiry_breaks_connection = True  # the test drops the client's connection to force it

    def __init__(self, tmp_path):
        self.etcd = Etcd()  # its own data dir, kept across stop()/start()
        self.store: EtcdStore | None = None
        self.syncer: EtcdSyncer | None = None

    async def setup(self):
        self.etcd.start()
        self.store = EtcdStore("127.0.0.1", self.etcd.port)
        await self.store.put_records(list(recorded_records().values()))

    def make_syncer(self):
        self.syncer = EtcdSyncer(EtcdStore("127.0.0.1", self.etcd.port), backoff=FAST)
        return self.syncer

    async def put(self, obj: dict):
        await self.store.put_object(obj)

    async def delete(self, kind, name, namespace=""):
        assert await self.store.delete(kind, name, namespace)

    async def put_invalid(self, obj: dict):
        """Bypass put_object's validation, as a buggy writer would."""
        key = f"/tortie/pods/{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        await self.store.client.put(key.encode(), json.dumps(obj).encode())

    async def stop(self):
        await self.store.reset()
        self.etcd.stop()

    async def start(self):
        self.etcd.start()  # same data dir, same port

    async def change_while_away(self, obj):
        """etcd cannot be written while it is down: write right after it is back, before
        (or while) the syncer reconnects."""
        await self.put(obj)

    async def delete_while_watch_lost(self, kind, name, namespace=""):
        """A deletion the watch never delivers: history compacted past it and the
        syncer's connection dropped, so only a relist can find out."""
        await self.delete(kind, name, namespace)
        await self.store.client.put(b"/tortie-other/filler", b"x")  # a revision past the delete
        rev, _ = await self.store.list_prefix()
        await self.store.compact(rev)
        # The connection breaks under the watch (reset() no longer closes a client that
        # calls still use, so close the channel itself, as a dropped connection would).
        c = self.syncer.store._client
        if c is not None:
            await c.close()

    async def close(self):
        if self.store:
            await self.store.close()
        self.etcd.close()


class KubernetesBackend:
    name = "kubernetes"
    expiry_breaks_connection = False  # 410 Gone is not a connection loss: no SyncStatus

    def __init__(self, tmp_path):
        self.api = FakeAPIServer(token="secret", replay=False)
        self.tmp_path = tmp_path

    async def setup(self):
        self.api.start()
        self.kubeconfig = self.api.kubeconfig(str(self.tmp_path / "kubeconfig"))

    def make_syncer(self):
        return KubernetesSyncer(kubeconfig=self.kubeconfig, backoff=FAST, watch_timeout=30)

    async def put(self, obj: dict):
        self.api.upsert(PLURAL[obj["kind"]], obj)

    async def delete(self, kind, name, namespace=""):
        self.api.remove(PLURAL[kind], name, namespace)

    async def put_invalid(self, obj: dict):
        await self.put(obj)

    async def stop(self):
        self.api.stop()

    async def start(self):
        self.api.start()  # same port

    async def change_while_away(self, obj):
        await self.put(obj)  # the fake keeps its state while down: changed by someone else

    async def delete_while_watch_lost(self, kind, name, namespace=""):
        self.api.remove(PLURAL[kind], name, namespace, silent=True)
        self.api.compact()
        self.api.drop_watches()  # the re-watch from the old resourceVersion gets 410

    async def close(self):
        self.api.stop()


class FanoutBackend(KubernetesBackend):
    """The stand-in API server behind a real tortie-fanout; the syncer is the agent's
    FanoutSyncer. The API's outages and relists reach the agent through the fan-out."""
    name = "fanout"

    async def setup(self):
        await super().setup()
        self.fanout = Fanout(self.kubeconfig, str(self.tmp_path / "fanout.log"), "--ping-interval", "1")
        self.fanout.start()

    def make_syncer(self):
        return FanoutSyncer([self.fanout.address], "vm", backoff=FAST)

    async def close(self):
        if hasattr(self, "fanout"):
            self.fanout.kill()
        await super().close()


BACKENDS = {"etcd": EtcdBackend, "kubernetes": KubernetesBackend, "fanout": FanoutBackend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    b = BACKENDS[request.param](tmp_path)
    yield b
    asyncio.run(b.close())


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 120))


def _pod(name, ns="x", ip="10.244.9.50", labels=None):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"pod": name}},
            "spec": {"nodeName": "vm", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def test_initial_list_then_in_sync(backend):
    """Every recorded object arrives once, then exactly one SyncStatus(True)."""
    async def body():
        await backend.setup()
        async with running(backend.make_syncer()) as rec:
            await rec.wait_in_sync()
            await rec.settle(0.3)
            ups = [e for e in rec.events if isinstance(e, model.Update)]
            first_status = next(i for i, e in enumerate(rec.events) if isinstance(e, model.SyncStatus))
            assert rec.events[first_status] == model.SyncStatus(True)
            assert first_status == len(ups)  # all updates came before it
            assert [e for e in rec.events if isinstance(e, model.SyncStatus)] == [model.SyncStatus(True)]
            want = recorded_records()
            assert {(u.kind, u.key): u.value for u in ups} == want
            assert len(ups) == len(want) == 7 + 1 + 1 + 9 + 11
            # Namespaces are delivered before the pods that live in them.
            kinds = [u.kind for u in ups]
            assert kinds.index("Namespace") < kinds.index("Pod")
    run(body())


def test_change_then_delete(backend):
    async def body():
        await backend.setup()
        async with running(backend.make_syncer()) as rec:
            await rec.wait_in_sync()
            m = rec.mark()
            await backend.put(_pod("new"))
            await rec.wait(lambda: rec.updates_since(m), what="pod x/new")
            m2 = rec.mark()
            changed = _pod("new", labels={"pod": "new", "role": "db"})
            await backend.put(changed)
            await rec.wait(lambda: rec.updates_since(m2), what="change")
            await backend.delete("Pod", "new", "x")
            await rec.wait(lambda: ("Pod", "x/new") not in rec.state, what="deletion")
            await rec.settle(0.3)
            ups = rec.updates_since(m)
            assert ups == [
                model.Update("Pod", "x/new", from_k8s(_pod("new"))),
                model.Update("Pod", "x/new", from_k8s(changed)),
                model.Update("Pod", "x/new", None),
            ]
            assert rec.statuses_since(m) == []
    run(body())


def test_unchanged_rewrite_emits_nothing_and_bad_object_is_skipped(backend):
    async def body():
        await backend.setup()
        async with running(backend.make_syncer()) as rec:
            await rec.wait_in_sync()
            m = rec.mark()
            # Re-writing an object with the same meaning: no churn downstream.
            await backend.put(to_k8s(rec.state[("Namespace", "x")]))
            # A syncer must survive an object it cannot convert (here: an impossible podIP).
            await backend.put_invalid(_pod("broken", ip="10.244.9.999"))
            await backend.put(_pod("after"))
            await rec.wait(lambda: ("Pod", "x/after") in rec.state, what="x/after")
            await rec.settle(0.3)
            assert [(u.kind, u.key) for u in rec.updates_since(m)] == [("Pod", "x/after")]
    run(body())


def test_relist_after_expired_history_emits_only_the_deletion(backend):
    """A deletion the watch never saw (history gone: etcd compaction / 410 Gone) comes out
    of the relist as a deletion; the unchanged objects cause no events."""
    async def body():
        await backend.setup()
        async with running(backend.make_syncer()) as rec:
            await rec.wait_in_sync()
            m = rec.mark()
            await backend.delete_while_watch_lost("Pod", "c", "x")
            await rec.wait(lambda: ("Pod", "x/c") not in rec.state, what="deletion of x/c")
            await rec.wait(lambda: rec.statuses_since(m) == [] or rec.statuses_since(m)[-1].in_sync,
                           what="back in sync")
            await rec.settle(0.3)
            assert rec.updates_since(m) == [model.Update("Pod", "x/c", None)]
            if backend.expiry_breaks_connection:
                assert [s.in_sync for s in rec.statuses_since(m)] == [False, True]
            else:
                assert rec.statuses_since(m) == []
            assert len(rec.state) == len(recorded_records()) - 1
    run(body())


@pytest.mark.parametrize("change", [False, True], ids=["nothing-changed", "object-changed"])
def test_datastore_restart(backend, change):
    """The datastore goes away and comes back on the same port (etcd: same data dir):
    SyncStatus(False), then the difference (none, or the one change), then SyncStatus(True)."""
    async def body():
        await backend.setup()
        async with running(backend.make_syncer()) as rec:
            await rec.wait_in_sync()
            m = rec.mark()
            await backend.stop()
            await rec.wait(lambda: rec.statuses_since(m), what="SyncStatus(False)")
            assert rec.statuses_since(m)[0].in_sync is False
            assert rec.statuses_since(m)[0].reason
            changed = _pod("a", ip="10.244.9.3", labels={"pod": "a", "moved": "yes"})
            if change and backend.name != "etcd":
                await backend.change_while_away(changed)
            await backend.start()
            if change and backend.name == "etcd":
                await backend.change_while_away(changed)
            await rec.wait(lambda: rec.statuses_since(m)[-1].in_sync, what="SyncStatus(True)")
            if change:
                await rec.wait(lambda: rec.state[("Pod", "x/a")] == from_k8s(changed), what="change")
            await rec.settle(0.3)
            statuses = rec.statuses_since(m)
            assert statuses[0].in_sync is False and statuses[-1].in_sync is True
            assert all(not s.in_sync for s in statuses[:-1])  # one outage, one recovery
            ups = rec.updates_since(m)
            assert ups == ([model.Update("Pod", "x/a", from_k8s(changed))] if change else [])
    run(body())
