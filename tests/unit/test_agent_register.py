"""Agent.register learns a pod's labels from the datastore when the watch has not
delivered the Pod yet, so the first dataplane pass for the endpoint already applies the
policies that select it by label."""
import asyncio

import pytest

from felix_agent.agent import Agent
from felix_agent.config import AgentConfig
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
    asyncio.run(a._learn_pod("x", "a"))
    assert a.cluster.pods["x/a"] == pod
    assert store.calls == [("Pod", "x", "a")]


def test_known_pod_is_not_read_again_and_outage_is_tolerated():
    pod = Pod("x", "a", labels=(("app", "web"),), node="n1")
    a = agent(FakeStore({"x/a": pod}))
    asyncio.run(a._learn_pod("x", "a"))
    a.store = FakeStore({}, fail=True)
    asyncio.run(a._learn_pod("x", "a"))  # known: no read
    assert a.store.calls == []
    asyncio.run(a._learn_pod("y", "b"))  # unknown and etcd down: no error, nothing learnt
    assert a.store.calls == [("Pod", "y", "b")] and "y/b" not in a.cluster.pods


# --- the etcd write and the dataplane pass overlap ---------------------------------------

class PublishStore(FakeStore):
    """put_record waits on `release` (the test decides when the etcd write 'returns')."""

    def __init__(self, fail=False):
        super().__init__({})
        self.put_fail, self.puts = fail, []
        self.release = asyncio.Event()

    async def put_record(self, record):
        self.puts.append(record.key)
        await self.release.wait()
        if self.put_fail:
            raise ConnectionError("etcd down")
        return record.key


async def one_pass(a):
    """What Agent.run_loop does for one woken pass, without a dataplane."""
    await a.queue.get()
    async with a._applied:
        a.applied_generation = a.generation
        a._applied.notify_all()


def wep(pod="a"):
    from felix_agent.model import WorkloadEndpoint
    return WorkloadEndpoint("x", pod, "n1", f"c-{pod}", f"cali-{pod}", ("10.65.0.7",))


def test_pass_runs_while_the_write_is_in_flight():
    """The loop is woken before the etcd write is awaited, so the pass can complete while
    the write is pending; register returns once both are done."""
    async def main():
        store = PublishStore()
        store.pods["x/a"] = Pod("x", "a", node="n1")
        a = agent(store)
        a._synced_once = True
        reg = asyncio.ensure_future(a.register(wep()))
        await one_pass(a)  # the pass finishes first ...
        await asyncio.sleep(0)
        assert store.puts == ["n1/x/a"] and not reg.done()  # ... the write is still pending
        store.release.set()
        await asyncio.wait_for(reg, 5)
        assert a._ds_weps["n1/x/a"] == wep() and not a._publish_due
    asyncio.run(main())


def test_write_finishing_first_still_waits_for_the_pass():
    async def main():
        store = PublishStore()
        store.release.set()
        a = agent(store)
        a._synced_once = True
        reg = asyncio.ensure_future(a.register(wep()))
        for _ in range(5):
            await asyncio.sleep(0)
        assert store.puts and not reg.done()  # published, pass not done: no answer yet
        await one_pass(a)
        await asyncio.wait_for(reg, 5)
    asyncio.run(main())


def test_unreachable_datastore_before_first_sync_fails_the_add():
    async def main():
        store = PublishStore(fail=True)
        store.release.set()
        a = agent(store)  # never synced: no pass will ever come
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(a.register(wep()), 5)
        assert a.applied_generation == -1  # failed before any pass: nothing programmed
    asyncio.run(main())


def test_unreachable_datastore_after_sync_wires_and_publishes_later():
    async def main():
        store = PublishStore(fail=True)
        store.release.set()
        a = agent(store)
        a._synced_once = True
        reg = asyncio.ensure_future(a.register(wep()))
        await one_pass(a)
        await asyncio.wait_for(reg, 5)
        assert a._publish_due and "n1/x/a" in a._local_weps and "n1/x/a" not in a._ds_weps
    asyncio.run(main())
