"""The fan-out's wire format (felix_agent/datastore/fanout/protocol.py): frames, the
versioned hello, and updates checked as every datastore checks its objects."""
import asyncio

import pytest

from felix_agent import model
from felix_agent.datastore.fanout import protocol

POD = model.Pod("x", "a", labels=(("app", "web"),), node="n1", ips=("10.244.1.5",),
                ports=(model.NamedPort("http", 80),))
NODE = model.Node("n1", ip="10.0.0.1/32", pod_cidrs=("10.244.1.0/24",), ip_from_status=True)


def read(data: bytes) -> dict:
    async def go():
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return await protocol.read_message(r)
    return asyncio.run(go())


@pytest.mark.parametrize("record", [POD, NODE, model.Namespace("x", (("team", "a"),)),
                                    model.BlockAffinity("10.244.1.0/24", "n1"),
                                    model.NetworkPolicy("x", "deny", policy_types=("Ingress", "Egress"))])
def test_an_update_arrives_as_the_same_record(record):
    kind = model.KIND_OF[type(record)]
    msg = read(protocol.update_frame(kind, record.key, record))
    assert protocol.decode_update(msg) == model.Update(kind, record.key, record)
    assert protocol.decode_update(read(protocol.update_frame(kind, record.key, None))) == \
        model.Update(kind, record.key, None)


def test_a_record_that_does_not_convert_or_sits_under_another_key_is_a_bad_record():
    msg = read(protocol.update_frame("Pod", "x/a", POD))
    msg["value"]["status"]["podIPs"] = [{"ip": "10.244.1.999"}]
    assert isinstance(protocol.decode_update(msg), protocol.BadRecord)
    moved = read(protocol.update_frame("Pod", "x/b", POD))
    assert protocol.decode_update(moved) == protocol.BadRecord("Pod", "x/b", "holds Pod x/a")


def test_hello_is_checked_for_version_and_node():
    assert protocol.check_hello(read(protocol.hello("n1"))) == "n1"
    with pytest.raises(protocol.ProtocolError, match="version 7 is not supported"):
        protocol.check_hello({"type": "hello", "version": 7, "node": "n1"})
    with pytest.raises(protocol.ProtocolError, match="names no node"):
        protocol.check_hello({"type": "hello", "version": protocol.PROTOCOL_VERSION, "node": ""})


@pytest.mark.parametrize("data,error", [
    (b"GET / HTTP/1.1\r\n\r\n", "not a tortie-fanout peer"),
    (b"\x00\x00\x00\x03abc", "not JSON"),
    (b"\x00\x00\x00\x02[]", "without a message type"),
])
def test_a_stranger_is_a_protocol_error(data, error):
    with pytest.raises(protocol.ProtocolError, match=error):
        read(data)


def test_a_cut_frame_is_the_end_of_the_stream():
    with pytest.raises(asyncio.IncompleteReadError):
        read(protocol.hello("n1")[:-2])
