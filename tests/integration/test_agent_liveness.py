"""/livez sees a stuck agent, and the etcd watcher cannot hang silently.

- A dataplane pass that never returns (the stand-in's apply blocks, as a driver stuck in a
  kernel call or on the xtables lock would) fails /livez over real HTTP within the
  liveness timeout, naming the dataplane; it passes again once the pass returns.
- The real EtcdSyncer against a real etcd on loopback (no root): aetcd's watch stream
  task dies without telling its watches (what it does when gRPC raises CancelledError in
  it, e.g. its channel closed under it).  The watch then waits forever; the agent used
  to stay "not ready" with /livez 200 for minutes.  Now the syncer's probe notices within
  a few seconds and relists, so a change made afterwards arrives.
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from felix_agent.agent import health
from felix_agent.agent.wiring import Agent
from felix_agent.config import AgentConfig
from felix_agent.datastore.etcd import EtcdStore
from felix_agent.model import Namespace, SyncStatus, Update
from tests.lab.etcd import Etcd
from tests.lab.etcd_syncer import synced_syncer


class StuckPlan:
    errors: list = []


class BlockingDataplane:
    """Stands in for felix_agent.dataplane.barrier.Dataplane: apply() blocks until released."""

    backend, modes, problems = "nft", (), {}

    def __init__(self):
        self.release = threading.Event()
        self.passes = 0

    def calculate(self, cluster, full=False):
        return StuckPlan()

    def apply(self, plan, full=True):
        self.passes += 1
        self.release.wait(30)
        return {}

    def bgp_status(self):
        return []

    def bird_died(self):
        return False


def livez(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_stuck_dataplane_pass_fails_livez():
    dp = BlockingDataplane()
    agent = Agent(AgentConfig(node_name="n1", liveness_timeout=1.0, resync_interval=0.5), dp, syncer=None)
    server = health.serve(agent.health, "127.0.0.1", 0)
    port = server.server_address[1]

    async def main():
        stop = asyncio.Event()
        loop_task = asyncio.create_task(agent.loop.run_loop(stop))
        agent.loop.emit(SyncStatus(True))
        await asyncio.sleep(0.3)
        assert dp.passes == 1
        assert (await asyncio.to_thread(livez, port))[0] == 200  # a pass in progress, not yet long
        await asyncio.sleep(1.5)
        code, body = await asyncio.to_thread(livez, port)
        assert code == 503 and "dataplane" in body, body
        dp.release.set()
        await asyncio.sleep(0.5)
        code, body = await asyncio.to_thread(livez, port)
        assert code == 200, body
        stop.set()
        agent.state.wake()
        await asyncio.wait_for(loop_task, 5)

    try:
        asyncio.run(main())
    finally:
        dp.release.set()
        server.shutdown()
        agent.shutdown()


async def _silent_watch_death(e: Etcd) -> None:
    store, _, events, task = await synced_syncer(e.port, "/live", timeout=2.0)
    try:
        await asyncio.sleep(0.3)  # the watch is established
        # aetcd's stream task ends by CancelledError, which its `except Exception` misses.
        handler = store.client._watcher._request_handler
        assert handler is not None and not handler.done()
        handler.cancel()
        await asyncio.sleep(0.2)
        writer = EtcdStore("127.0.0.1", e.port, "/live", timeout=2.0)
        await writer.put_record(Namespace(name="after"))
        await writer.close()
        deadline = time.monotonic() + 15
        while not any(isinstance(ev, Update) and ev.key == "after" for ev in events):
            assert time.monotonic() < deadline, "the watch died silently and nothing noticed"
            await asyncio.sleep(0.05)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def test_silently_dead_watch_is_noticed_and_relisted():
    with Etcd() as e:
        asyncio.run(_silent_watch_death(e))
