"""Agent.register learns a pod's labels from the datastore when the watch has not
delivered the Pod yet, so the first dataplane pass for the endpoint already applies the
policies that select it by label."""
import asyncio

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
