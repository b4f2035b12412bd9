"""The etcd datastore against a real etcd on loopback: the key layout, validation before
writing, the compare-and-swap primitives IPAM relies on, and the syncer's relist when its
watch would start from a compacted revision. No root needed."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from felix_agent import model
from felix_agent.datastore.convert import ConvertError
from felix_agent.datastore.base import Backoff
from felix_agent.datastore.etcd import EtcdStore, EtcdSyncer, EtcdUnavailable, parse_endpoint
from tests.fakes.recorder import running
from tests.lab import free_port


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


POD = model.Pod("x", "a", labels=(("pod", "a"),), node="n1", ips=("10.65.0.5",),
                ports=(model.NamedPort("http", 80),))
WEP = model.WorkloadEndpoint("x", "a", "n1.lab", "cid", "cali1234567890a", ("10.65.0.5",), "ee:ee:ee:ee:ee:ee")
BLOCK = model.BlockAffinity("10.65.0.0/26", "n1", "default")
POOL = model.IPPool("default", "10.65.0.0/16", mode="vxlan")


def test_parse_endpoint():
    assert parse_endpoint("127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_endpoint("http://10.0.0.1:2379,http://10.0.0.2:2379") == ("10.0.0.1", 2379)
    with pytest.raises(ValueError, match="not host:port"):
        parse_endpoint("localhost")


def test_key_layout_and_round_trip(etcd):
    async def body():
        async with EtcdStore("127.0.0.1", etcd.port) as s:
            keys = [await s.put_record(r) for r in (POD, WEP, BLOCK, POOL, model.Namespace("x"))]
            assert keys == ["/tortie/pods/x/a", "/tortie/workloadendpoints/n1.lab/x/a",
                            "/tortie/blockaffinities/10.65.0.0-26", "/tortie/ippools/default",
                            "/tortie/namespaces/x"]
            stored = json.loads(await s.get_value("/tortie/pods/x/a"))
            assert stored["kind"] == "Pod" and stored["metadata"]["namespace"] == "x"
            assert await s.get("Pod", "a", "x") == POD
            assert await s.get("WorkloadEndpoint", "n1.lab/x/a") == WEP
            assert await s.get("BlockAffinity", "10.65.0.0/26") == BLOCK
            assert await s.get_all("IPPool") == [POOL]
            assert await s.delete("Pod", "a", "x") is True
            assert await s.delete("Pod", "a", "x") is False
            assert await s.get("Pod", "a", "x") is None
    run(body())


def test_put_object_validates_first(etcd):
    async def body():
        async with EtcdStore("127.0.0.1", etcd.port, prefix="/other") as s:
            bad = {"apiVersion": "tortie.io/v1", "kind": "IPPool", "metadata": {"name": "p"},
                   "spec": {"cidr": "10.65.0.0/16", "mode": "gre"}}
            with pytest.raises(ConvertError, match="IPPool p: spec.mode"):
                await s.put_object(bad)
            assert (await s.list_prefix())[1] == []  # nothing written
            bad["spec"]["mode"] = "ipip"
            rec = await s.put_object(bad)
            assert rec == model.IPPool("p", "10.65.0.0/16", mode="ipip")
            assert [k for k, _ in (await s.list_prefix())[1]] == ["/other/ippools/p"]
    run(body())


def test_create_if_absent_has_exactly_one_winner(etcd):
    """Two nodes (two clients) race 20 times each for one block: one claim wins."""
    async def body():
        a = EtcdStore("127.0.0.1", etcd.port)
        b = EtcdStore("127.0.0.1", etcd.port)
        key = "/tortie/blockaffinities/10.65.1.0-26"
        results = await asyncio.gather(*[
            (a if i % 2 else b).create_if_absent(key, f"node-{i % 2}") for i in range(40)])
        assert results.count(True) == 1
        winner = (await a.get_value(key)).decode()
        assert winner == f"node-{results.index(True) % 2}"
        loser = "node-1" if winner == "node-0" else "node-0"
        assert await a.delete_if_value(key, loser) is False  # not the loser's to release
        assert await a.get_value(key) == winner.encode()
        assert await a.replace_if_value(key, loser, "node-9") is False
        assert await a.replace_if_value(key, winner, "node-9") is True
        assert await b.delete_if_value(key, "node-9") is True
        assert await a.get_value(key) is None
        assert await b.create_if_absent(key, "node-2") is True
        await a.close(), await b.close()
    run(body())


def test_unreachable_etcd_is_a_clear_error():
    async def body():
        s = EtcdStore("127.0.0.1", free_port(), timeout=1)
        with pytest.raises(EtcdUnavailable, match=r"etcd at 127.0.0.1:\d+"):
            await s.get_all("Pod")
        await s.close()
    run(body())


def test_watch_from_compacted_revision_relists(etcd):
    """Between the list and the watch, a pod is deleted and history compacted: the watch
    cannot start at list revision + 1, so the syncer relists and emits the deletion, with
    no SyncStatus(False) (the connection was fine) and no churn for other objects."""
    async def body():
        writer = EtcdStore("127.0.0.1", etcd.port)
        await writer.put_records([model.Namespace("x"), POD, model.Pod("x", "b", ips=("10.65.0.6",))])
        done = False

        async def after_list(revision):
            nonlocal done
            if done:
                return
            done = True
            await writer.delete("Pod", "a", "x")
            await writer.client.put(b"/unrelated", b"1")
            await writer.compact(revision + 2)

        syncer = EtcdSyncer(EtcdStore("127.0.0.1", etcd.port), after_list=after_list,
                            backoff=Backoff(0.05, 0.5))
        async with running(syncer) as rec:
            await rec.wait(lambda: ("Pod", "x/a") not in rec.state and rec.state, what="deletion")
            await rec.settle(0.3)
            assert syncer.lists == 2
            assert rec.events == [
                model.Update("Namespace", "x", model.Namespace("x")),
                model.Update("Pod", "x/a", POD),
                model.Update("Pod", "x/b", model.Pod("x", "b", ips=("10.65.0.6",))),
                model.SyncStatus(True),
                model.Update("Pod", "x/a", None),
            ]
        await writer.close()
    run(body())


def test_syncer_skips_values_that_do_not_belong(etcd, caplog):
    """Not JSON, wrong kind for the key, or an object whose own name says another key:
    logged and skipped. Keys outside the model (IPAM bookkeeping) are ignored."""
    async def body():
        w = EtcdStore("127.0.0.1", etcd.port)
        await w.client.put(b"/tortie/pods/x/junk", b"{not json")
        await w.client.put(b"/tortie/pods/x/other", json.dumps(
            {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "elsewhere", "namespace": "x"}}).encode())
        await w.client.put(b"/tortie/nodes/n1", json.dumps(
            {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "n1"}}).encode())
        await w.client.put(b"/tortie/ipam/handles/abc", b"whatever")
        await w.put_record(POD)
        with caplog.at_level(logging.WARNING):
            async with running(EtcdSyncer(EtcdStore("127.0.0.1", etcd.port))) as rec:
                await rec.wait_in_sync()
                assert rec.events == [model.Update("Pod", "x/a", POD), model.SyncStatus(True)]
        text = caplog.text
        assert "/tortie/pods/x/junk: not JSON" in text
        assert "/tortie/pods/x/other: the object inside belongs at /tortie/pods/x/elsewhere" in text
        assert "/tortie/nodes/n1: holds a Namespace, not a Node" in text
        await w.close()
    run(body())


def test_invalid_update_keeps_last_good_version(etcd):
    async def body():
        w = EtcdStore("127.0.0.1", etcd.port)
        await w.put_record(POD)
        async with running(EtcdSyncer(EtcdStore("127.0.0.1", etcd.port))) as rec:
            await rec.wait_in_sync()
            m = rec.mark()
            await w.client.put(b"/tortie/pods/x/a", b'{"kind":"Pod","metadata":{"name":"a","namespace":"x"},'
                               b'"status":{"podIP":"nope"}}')
            await w.put_record(model.Namespace("y"))
            await rec.wait(lambda: ("Namespace", "y") in rec.state, what="namespace y")
            assert rec.since(m) == [model.Update("Namespace", "y", model.Namespace("y"))]
            assert rec.state[("Pod", "x/a")] == POD
        await w.close()
    run(body())
