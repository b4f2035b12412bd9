"""tortie-fanout (felix_agent/datastore/fanout/) as it runs: a real tortie-fanout process
watching the stand-in kube-apiserver (tests/fakes/apiserver.py, which counts the requests
it serves: that is how the watches are counted), agents' FanoutSyncers connected to it over
loopback TCP, in this process or as processes of their own (tests/lab/fanout_client.py)
that are killed and started again. The stand-in is used rather than the real-apiserver lab
(tests/kube) because the count of watch requests must be exact, and building and starting
a real control plane for it costs minutes. No root needed; nothing leaves loopback.

The contract tests every Syncer passes (tests/integration/test_datastore_syncers.py) run
against the fan-out too; this file covers what only a fan-out has.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest

from felix_agent import model
from felix_agent.datastore.base import Backoff
from felix_agent.datastore.convert import from_k8s
from felix_agent.datastore.fanout import protocol
from felix_agent.datastore.fanout.client import FanoutSyncer
from felix_agent.datastore.kubernetes import KubernetesSyncer
from tests.fakes.apiserver import FakeAPIServer
from tests.fakes.recorder import running
from tests.lab.cluster import wait_for
from tests.lab.fanout import ClientProcess, Fanout

FAST = Backoff(initial=0.05, maximum=0.5)
RESOURCE_PATHS = ("/api/v1/pods", "/api/v1/namespaces", "/api/v1/nodes",
                  "/apis/networking.k8s.io/v1/networkpolicies")


@pytest.fixture
def api():
    with FakeAPIServer(token="secret", replay=False) as a:
        yield a


@pytest.fixture
def kubeconfig(api, tmp_path):
    return api.kubeconfig(str(tmp_path / "kubeconfig"))


@pytest.fixture
def fanout(kubeconfig, tmp_path):
    f = Fanout(kubeconfig, str(tmp_path / "fanout.log"), "--ping-interval", "1")
    f.start()
    yield f
    f.kill()


def watches(api) -> int:
    return api.count(lambda p, q: q.get("watch") in ("true", "1"))


def lists(api) -> int:
    return api.count(lambda p, q: p in RESOURCE_PATHS and q.get("watch") not in ("true", "1"))


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 120))


async def direct_model(kubeconfig: str) -> dict:
    """The model an agent watching the API itself reaches (the reference)."""
    async with running(KubernetesSyncer(kubeconfig=kubeconfig, backoff=FAST, watch_timeout=30)) as rec:
        await rec.wait_in_sync()
        return dict(rec.state)


def client(fanout: Fanout, node: str) -> FanoutSyncer:
    return FanoutSyncer([fanout.address], node, backoff=FAST)


def _pod(name, ns="x", ip="10.244.9.50", labels=None):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"pod": name}},
            "spec": {"nodeName": "vm", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def test_many_agents_share_one_watch_set_and_reach_the_direct_model(api, kubeconfig, fanout):
    """Eight agents through one fan-out: the API serves ONE list and ONE watch per resource
    (an agent watching the API itself costs four more), and every agent's model is the
    one the direct syncer builds, before and after a change."""
    async def body():
        async with contextlib.AsyncExitStack() as stack:
            recs = [await stack.enter_async_context(running(client(fanout, f"node-{i}"))) for i in range(8)]
            for r in recs:
                await r.wait_in_sync()
            assert (watches(api), lists(api)) == (4, 4)
            api.upsert("pods", _pod("new"))
            for r in recs:
                await r.wait(lambda r=r: ("Pod", "x/new") in r.state, what="x/new through the fan-out")
                assert r.state[("Pod", "x/new")] == from_k8s(_pod("new"))
            assert (watches(api), lists(api)) == (4, 4)
            want = await direct_model(kubeconfig)
            assert lists(api) == 8  # an agent watching the API itself lists all four again
            assert len(want) == 30
            for r in recs:
                assert r.state == want
            assert fanout.metrics()["tortie_fanout_clients"] == 8
    run(body())


def test_a_killed_agent_reconnects_to_the_current_model(api, kubeconfig, fanout):
    a = ClientProcess(fanout.address, "node-a")
    try:
        wait_for(lambda: (True, "") in a.statuses, what="agent process in sync")
        a.kill()
        wait_for(lambda: fanout.metrics()["tortie_fanout_clients"] == 0, what="the server notices the kill")
        # Changes while it is dead.
        api.remove("pods", "c", "x")
        api.upsert("pods", _pod("a", ip="10.244.9.3", labels={"pod": "a", "moved": "yes"}))
        a = ClientProcess(fanout.address, "node-a")
        wait_for(lambda: (True, "") in a.statuses, what="restarted agent process in sync")
        want = asyncio.run(direct_model(kubeconfig))
        assert a.model() == want
        assert ("Pod", "x/c") not in want and want[("Pod", "x/a")].labels == (("moved", "yes"), ("pod", "a"))
        m = fanout.metrics()
        assert m["tortie_fanout_connections_total"] == 2 and m["tortie_fanout_clients"] == 1
    finally:
        a.kill()


def test_server_killed_and_restarted_agents_resync_exactly_the_difference(api, kubeconfig, fanout):
    """kill -9 of the fan-out: every agent reports the loss once and keeps its records (no
    deletion reaches the agent); the API changes meanwhile; the fan-out comes back on
    the same port: each agent receives exactly the two changes (no duplicate, nothing
    missing), then is in sync again, with the direct syncer's model."""
    async def body():
        async with contextlib.AsyncExitStack() as stack:
            recs = [await stack.enter_async_context(running(client(fanout, f"node-{i}"))) for i in range(3)]
            for r in recs:
                await r.wait_in_sync()
            marks = [r.mark() for r in recs]
            before = dict(recs[0].state)
            fanout.kill()
            for r, m in zip(recs, marks):
                await r.wait(lambda r=r, m=m: r.statuses_since(m), what="SyncStatus(False)")
            changed = _pod("a", ip="10.244.9.3", labels={"pod": "a", "moved": "yes"})
            api.upsert("pods", changed)
            api.remove("pods", "c", "x")
            await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile
            for r, m in zip(recs, marks):
                assert r.updates_since(m) == [] and r.state == before
            fanout.start()
            for r, m in zip(recs, marks):
                await r.wait(lambda r=r, m=m: r.statuses_since(m)[-1].in_sync, what="back in sync")
            want = await direct_model(kubeconfig)
            for r, m in zip(recs, marks):
                await r.settle(0.3)
                assert r.updates_since(m) == [model.Update("Pod", "x/a", from_k8s(changed)),
                                              model.Update("Pod", "x/c", None)]
                st = r.statuses_since(m)
                assert [s.in_sync for s in st] == [False, True]
                assert "tortie-fanout 127.0.0.1:" in st[0].reason
                assert r.state == want
    run(body())


def _raw_hello(port: int, payload: bytes, rcvbuf: int = 0) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(payload)
    return s


def _read_frame(s: socket.socket) -> dict:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(f"closed after {buf!r}")
        buf += chunk
    return json.loads(buf[4:4 + struct.unpack(">I", buf[:4])[0]])


def _frame(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body


def test_a_slow_agent_is_cut_off_while_the_others_keep_up(api, kubeconfig, tmp_path):
    """An agent that stops reading (a tiny receive buffer, never read) falls behind a
    200-update queue and is disconnected; a normal agent gets all 3,000 changes on its
    one connection, never out of sync."""
    with Fanout(kubeconfig, str(tmp_path / "fanout.log"), "--max-queue", "200") as fanout:
        slow = _raw_hello(fanout.port, _frame({"type": "hello", "version": 1, "node": "slow"}), rcvbuf=4096)

        async def body():
            syncer = client(fanout, "quick")
            async with running(syncer) as rec:
                await rec.wait_in_sync()
                m = rec.mark()

                def changes():  # 50 at a time, as a busy cluster makes them; 4 KB each, so
                    # that they overflow the kernel's socket buffers (up to 4 MB) too
                    for i in range(3000):
                        pod = _pod("a", labels={"pod": "a", "n": str(i)})
                        pod["metadata"]["annotations"] = {"note": "x" * 4096}
                        api.upsert("pods", pod)
                        if i % 50 == 49:
                            time.sleep(0.01)
                await asyncio.to_thread(changes)
                await rec.wait(lambda: rec.state[("Pod", "x/a")].labels == (("n", "2999"), ("pod", "a")),
                               timeout=60, what="the last change")
                assert rec.statuses_since(m) == [] and syncer.sessions == 1
                ns = [dict(u.value.labels)["n"] for u in rec.updates_since(m)]
                assert ns == [str(i) for i in range(3000)]  # every one, in order, once
        run(body())
        assert fanout.metrics()["tortie_fanout_slow_disconnects_total"] == 1
        with pytest.raises((ConnectionResetError, EOFError)):
            while True:  # what was buffered, then the reset
                if not slow.recv(65536):
                    raise EOFError
        slow.close()


@pytest.mark.parametrize("payload,message", [
    (_frame({"type": "hello", "version": 99, "node": "n1"}),
     "protocol version 99 is not supported: this server speaks version 1"),
    (_frame({"type": "hello", "version": 1}), "the hello names no node"),
    (_frame({"type": "update", "kind": "Pod"}), "the first message must be a hello, got 'update'"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a tortie-fanout peer"),
], ids=["version", "no-node", "not-hello", "http"])
def test_a_bad_hello_is_refused_with_the_reason(fanout, payload, message):
    s = _raw_hello(fanout.port, payload)
    reply = _read_frame(s)
    assert reply["type"] == "refused" and message in reply["message"], reply
    assert s.recv(1) == b""  # then closed
    s.close()
    assert fanout.metrics()["tortie_fanout_refused_total"] == 1


def test_an_agent_of_another_protocol_version_stays_unready_with_the_reason(api, fanout, monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 2)

    async def body():
        async with running(client(fanout, "node-new")) as rec:
            await rec.wait(lambda: rec.statuses_since(0), what="SyncStatus(False)")
            await asyncio.sleep(1.0)  # it retries (with backoff); still refused, reported once
            assert rec.statuses_since(0) == [model.SyncStatus(
                False, f"tortie-fanout 127.0.0.1:{fanout.port} refused this agent: protocol version 2 is "
                "not supported: this server speaks version 1; run agents and tortie-fanout of the same "
                "release")]
            assert rec.state == {}
    run(body())
    assert fanout.metrics()["tortie_fanout_refused_total"] >= 2


def probe(f: Fanout, path: str) -> tuple[int, dict]:
    """(HTTP status, JSON document) of one of the fan-out's probes."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{f.metrics_port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_readyz_follows_the_api_watch_and_livez_the_event_loop(api, tmp_path):
    """Not ready while the API refuses it (it could only make agents wait), ready once its
    watch is in sync, not ready again when the API goes away; live throughout."""
    refused = api.kubeconfig(str(tmp_path / "refused.kubeconfig"), token="not-the-token")
    with Fanout(refused, str(tmp_path / "refused.log")) as f:
        time.sleep(1)  # several failed lists
        code, doc = probe(f, "/readyz")
        assert code == 503 and not doc["ready"] and "upstream" in doc["reasons"]
        assert probe(f, "/livez")[0] == 200
    api.upsert("namespaces", {"metadata": {"name": "ns1"}})
    with Fanout(api.kubeconfig(str(tmp_path / "kubeconfig")), str(tmp_path / "fanout.log")) as f:
        wait_for(lambda: probe(f, "/readyz")[0] == 200, timeout=30, what="ready once in sync")
        code, doc = probe(f, "/readyz")
        assert doc["ready"] and doc["records"] >= 1 and doc["reasons"] == {}
        assert set(doc) == {"ready", "live", "clients", "records", "reasons"}  # the README's example
        api.stop()
        wait_for(lambda: probe(f, "/readyz")[0] == 503, timeout=30, what="not ready once the API is gone")
        assert "upstream" in probe(f, "/readyz")[1]["reasons"]
        assert probe(f, "/livez")[0] == 200
        assert "tortie_fanout_in_sync 0.0" in urllib.request.urlopen(
            f"http://127.0.0.1:{f.metrics_port}/metrics", timeout=5).read().decode()
