"""EndpointRegistry.register learns a pod's labels from the datastore when the watch has not
delivered the Pod yet, so the first dataplane pass for the endpoint already applies the
policies that select it by label."""
import asyncio

import pytest

from felix_agent.agent.wiring import Agent
from felix_agent.config import AgentConfig
from felix_agent.datastore.etcd import encode_record, record_key
from felix_agent.model import Pod


class FakeStore:
    """Stands in for EtcdStore.get only (the datastore read under test)."""

    def __init__(self, pods, fail=False):
        self.pods, self.fail, self.calls = pods, fail, []

    async def get(self, kind, name, namespace=""):
        self.calls.append((kind, namespace, name))
        if self.fail:
            raise ConnectionError("etcd down")
        return self.pods.get(f"{namespace}/{name}")


def agent(store):
    return Agent(AgentConfig(node_name="n1"), dataplane=None, syncer=None, store=store)


def test_unknown_pod_is_read_from_the_datastore():
    pod = Pod("x", "a", labels=(("app", "web"),), node="n1")
    store = FakeStore({"x/a": pod})
    a = agent(store)
    asyncio.run(a.endpoints._learn_pod("x", "a"))
    assert a.state.cluster.pods["x/a"] == pod
    assert store.calls == [("Pod", "x", "a")]


def test_known_pod_is_not_read_again_and_outage_is_tolerated():
    pod = Pod("x", "a", labels=(("app", "web"),), node="n1")
    a = agent(FakeStore({"x/a": pod}))
    asyncio.run(a.endpoints._learn_pod("x", "a"))
    a.endpoints.reader = FakeStore({}, fail=True)
    asyncio.run(a.endpoints._learn_pod("x", "a"))  # known: no read
    assert a.endpoints.reader.calls == []
    asyncio.run(a.endpoints._learn_pod("y", "b"))  # unknown and etcd down: no error, nothing learnt
    assert a.endpoints.reader.calls == [("Pod", "y", "b")] and "y/b" not in a.state.cluster.pods


# --- the ADD waits for the pass, not for the etcd write ---------------------------------

class PublishStore(FakeStore):
    """Stands in for EtcdStore's writes: put_record waits on `release` (the test decides
    when the etcd write 'returns'); deletes compare the stored value like etcd's txn."""

    prefix = "/tortie"

    def __init__(self, fail=False):
        super().__init__({})
        self.put_fail, self.puts, self.log = fail, [], []
        self.values: dict[str, bytes] = {}
        self.release = asyncio.Event()

    async def put_record(self, record):
        self.puts.append(record.key)
        await self.release.wait()
        if self.put_fail:
            raise ConnectionError("etcd down")
        self.values[record_key(self.prefix, record)] = encode_record(record)
        self.log.append(("put", record.key, record.ips))
        return record.key

    async def delete_if_value(self, key, value):
        if self.put_fail:
            raise ConnectionError("etcd down")
        if self.values.get(key) != value:
            return False
        del self.values[key]
        self.log.append(("delete", key, ()))
        return True

    async def get_value(self, key):
        return self.values.get(key)


async def one_pass(a):
    """What AgentLoop.run_loop does for one woken pass, without a dataplane."""
    await a.state.queue.get()
    await a.state.programmed(a.state.generation)


def wep(pod="a", ip="10.65.0.7"):
    from felix_agent.model import WorkloadEndpoint
    return WorkloadEndpoint("x", pod, "n1", f"c-{pod}", f"cali-{pod}", (ip,))


async def until(pred, timeout=5.0):
    """Let the agent's tasks run until `pred()` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def synced_agent(store):
    a = agent(store)
    a.state.synced_once = a.status.in_sync = True
    return a


def test_add_returns_after_the_pass_while_the_write_is_still_in_flight():
    """register waits for the dataplane pass only; the publisher task writes the endpoint
    (here: its write is held back and still pending when the ADD has its answer)."""
    async def main():
        store = PublishStore()
        store.pods["x/a"] = Pod("x", "a", node="n1")
        a = synced_agent(store)
        publisher = asyncio.ensure_future(a.publisher.run())
        reg = asyncio.ensure_future(a.endpoints.register(wep()))
        await asyncio.sleep(0.05)
        # No pass yet: no answer, and the publisher lets the pass go first (no write yet).
        assert not reg.done() and store.puts == []
        await one_pass(a)
        await asyncio.wait_for(reg, 5)
        await until(lambda: store.puts == ["n1/x/a"])
        assert "n1/x/a" not in a.publisher.copies  # the write is pending; the ADD had its answer
        store.release.set()
        await until(lambda: "n1/x/a" in a.publisher.copies)
        assert a.publisher.copies["n1/x/a"] == wep() and not a.publisher.due
        publisher.cancel()
    asyncio.run(main())


def test_unreachable_datastore_before_first_sync_fails_the_add():
    async def main():
        store = PublishStore(fail=True)
        store.release.set()
        a = agent(store)  # never synced: no pass will ever come
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(a.endpoints.register(wep()), 5)
        assert a.state.applied_generation == -1  # failed before any pass: nothing programmed
    asyncio.run(main())


def test_unreachable_datastore_after_sync_wires_and_publishes_later(monkeypatch):
    import felix_agent.agent.endpoint_publisher as publisher_mod
    monkeypatch.setattr(publisher_mod, "PUBLISH_RETRY_MIN", 0.01)

    async def main():
        store = PublishStore(fail=True)
        store.release.set()
        a = synced_agent(store)
        publisher = asyncio.ensure_future(a.publisher.run())
        reg = asyncio.ensure_future(a.endpoints.register(wep()))
        await one_pass(a)
        await asyncio.wait_for(reg, 5)  # wired although etcd refuses the write
        await asyncio.sleep(0.05)
        assert a.publisher.due and "n1/x/a" in a.endpoints.local and "n1/x/a" not in a.publisher.copies
        store.put_fail = False  # etcd is back: the retry publishes it
        await asyncio.sleep(0.1)
        assert a.publisher.copies["n1/x/a"] == wep() and not a.publisher.due
        publisher.cancel()
    asyncio.run(main())


def test_publisher_deletes_before_it_writes_and_keeps_each_keys_order():
    """A DEL then an ADD that reuses the address: the old endpoint leaves the datastore
    before the new one arrives, so no moment has one address under two pods' labels; and
    an endpoint added then deleted before the publisher ran is never written at all."""
    async def main():
        store = PublishStore()
        store.release.set()
        a = synced_agent(store)
        publisher = asyncio.ensure_future(a.publisher.run())
        reg = asyncio.ensure_future(a.endpoints.register(wep("old", "10.65.0.9")))
        await one_pass(a)
        await reg
        await until(lambda: store.log)
        assert store.log == [("put", "n1/x/old", ("10.65.0.9",))]
        # The publisher is busy elsewhere while a DEL and the next ADD come in.
        a.publisher._wake.clear()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await a.endpoints.unregister("x", "old")
        await one_pass(a)
        for pod in ("new", "brief"):
            reg = asyncio.ensure_future(a.endpoints.register(wep(pod, "10.65.0.9" if pod == "new" else "10.65.0.10")))
            await one_pass(a)
            await reg
        await a.endpoints.unregister("x", "brief")
        await one_pass(a)
        publisher = asyncio.ensure_future(a.publisher.run())
        await until(lambda: len(store.log) >= 3)
        await asyncio.sleep(0.01)
        assert store.log[1:] == [("delete", "/tortie/workloadendpoints/n1/x/old", ()),
                                 ("put", "n1/x/new", ("10.65.0.9",))]
        assert list(store.values) == ["/tortie/workloadendpoints/n1/x/new"]
        publisher.cancel()
    asyncio.run(main())
