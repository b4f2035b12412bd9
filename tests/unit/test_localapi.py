"""The local API's transport and request checks, without root: a real Unix socket and
real SCM_RIGHTS fds, with a small recording handler in place of CNIService (the full
service with real plumbing is in tests/integration/test_localapi.py)."""
import asyncio
import concurrent.futures
import os
import socket
import stat

import pytest

from cni_plugin import agent_client
from podnet.agent_protocol import recv_msg
from podnet.errors import (DECODE_FAILURE, INCOMPATIBLE_VERSION, INTERNAL, INVALID_CONFIG, INVALID_ENV,
                               PLUGIN_NOT_AVAILABLE, TRY_AGAIN_LATER, CNIError)
from felix_agent.ipam import IPAM, PodCIDRBackend
from felix_agent.agent.cni_request import parse_request
from felix_agent.agent.cni_service import CNIService
from felix_agent.agent.localapi import LocalAPI

CONF = {"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "tortie", "ipam": {"type": "tortie"}}


def req(command="DEL", **kw):
    base = {"command": command, "container_id": "abc123", "ifname": "eth0", "netns": "/var/run/netns/x",
            "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0"}, "config": dict(CONF)}
    base.update(kw)
    return base


@pytest.mark.parametrize("changes,code,msg", [
    ({"command": "VERSION"}, INVALID_ENV, "unknown command"),
    ({"command": "BOGUS"}, INVALID_ENV, "unknown command"),
    ({"container_id": ""}, INVALID_ENV, "needs a container id"),
    ({"container_id": "-bad"}, INVALID_ENV, "not a valid id"),
    ({"ifname": ""}, INVALID_ENV, "CNI_IFNAME is empty"),
    ({"ifname": "a/b"}, INVALID_ENV, "not allowed"),
    ({"ifname": "x" * 16}, INVALID_ENV, "longer than 15"),
    ({"config": None}, DECODE_FAILURE, "no network config"),
    ({"config": {"cniVersion": "1.1.0", "type": "tortie", "ipam": {"type": "tortie"}}}, INVALID_CONFIG, "network name"),
    ({"config": {**CONF, "cniVersion": "0.2.0"}}, INCOMPATIBLE_VERSION, "incompatible CNI version"),
    ({"config": {**CONF, "ipam": {}}}, INVALID_CONFIG, "ipam.type is missing"),
    ({"config": {**CONF, "mtu": 20}}, INVALID_CONFIG, "mtu"),
    ({"args": {"K8S_POD_NAME": "has space"}}, INVALID_ENV, "not a Kubernetes name"),
    ({"args": ["x"]}, INVALID_ENV, "args must be an object"),
    ({"ips": ["10.0.0.5"]}, DECODE_FAILURE, "CIDR"),
    ({"ips": "10.0.0.5/32"}, DECODE_FAILURE, "list"),
])
def test_bad_requests_are_refused_with_cni_codes(changes, code, msg):
    with pytest.raises(CNIError) as ei:
        parse_request(req(**changes), None)
    assert ei.value.code == code and msg in ei.value.msg


def test_add_needs_a_network_namespace_fd_that_is_not_the_agents_own():
    with pytest.raises(CNIError, match="no fd was passed") as ei:
        parse_request(req("ADD"), None)
    assert ei.value.code == INVALID_ENV
    r, w = os.pipe()
    try:
        with pytest.raises(CNIError, match="not a network namespace"):
            parse_request(req("ADD"), r)
    finally:
        os.close(r), os.close(w)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        with pytest.raises(CNIError, match="agent's own network namespace"):
            parse_request(req("ADD"), own)
    finally:
        os.close(own)


def test_good_requests_parse():
    r = parse_request(req("DEL", ips=["10.0.0.5/32"], args={"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "p",
                                                             "OTHER": "dropped"}), None)
    assert (r.command, r.container_id, r.ifname, r.namespace, r.pod, r.ips) == (
        "DEL", "abc123", "eth0", "ns", "p", ("10.0.0.5/32",))
    assert "OTHER" not in r.args
    gc = parse_request({"command": "GC", "config": {**CONF, "cni.dev/valid-attachments": [
        {"containerID": "c1", "ifname": "eth0"}]}}, None)
    assert gc.conf.valid_attachments == [("c1", "eth0")]
    st = parse_request({"command": "STATUS", "config": CONF}, None)
    assert st.container_id == ""


class Recorder:
    """Stands in for CNIService: records what arrived, can wait for company or fail."""

    def __init__(self, barrier=None, fail=None):
        self.seen = []
        self.barrier = barrier
        self.fail = fail

    async def handle(self, r, fd):
        self.seen.append((r.command, r.container_id, fd is not None))
        if self.barrier is not None:
            await self.barrier.wait()
        if self.fail:
            raise self.fail
        return {"cniVersion": "1.1.0", "echo": r.container_id}


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def call(path, request, fds=()):
    return agent_client.call(path, request, fds, timeout=10)


def test_socket_is_0600_in_a_created_dir_and_removed_on_stop(tmp_path):
    path = str(tmp_path / "run" / "tortie" / "agent.sock")

    async def body():
        async with LocalAPI(path, Recorder()):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
            res = await asyncio.to_thread(call, path, req("DEL"))
            assert res == {"cniVersion": "1.1.0", "echo": "abc123"}
        assert not os.path.exists(path)
    asyncio.run(body())


def test_errors_come_back_as_cni_errors(tmp_path):
    path = str(tmp_path / "agent.sock")

    async def body():
        async with LocalAPI(path, Recorder(fail=CNIError(PLUGIN_NOT_AVAILABLE, "nope", "why"))):
            with pytest.raises(CNIError) as ei:
                await asyncio.to_thread(call, path, req("DEL"))
            assert (ei.value.code, ei.value.msg, ei.value.details) == (PLUGIN_NOT_AVAILABLE, "nope", "why")
            with pytest.raises(CNIError) as ei:
                await asyncio.to_thread(call, path, req("DEL", container_id=""))
            assert ei.value.code == INVALID_ENV
        async with LocalAPI(path, Recorder(fail=ZeroDivisionError("boom"))):
            with pytest.raises(CNIError) as ei:
                await asyncio.to_thread(call, path, req("DEL"))
            assert ei.value.code == INTERNAL and "boom" in ei.value.msg
    asyncio.run(body())


def test_a_request_cancelled_from_below_still_gets_an_answer(tmp_path, caplog):
    """grpc.aio raises CancelledError in a call whose channel closed; the request that made
    it used to end with the socket closed, no reply and no log line."""
    path = str(tmp_path / "agent.sock")

    async def body():
        async with LocalAPI(path, Recorder(fail=asyncio.CancelledError())):
            with pytest.raises(CNIError) as ei:
                await asyncio.to_thread(call, path, req("DEL"))
            assert ei.value.code == TRY_AGAIN_LATER and "cancelled" in ei.value.msg
            # the server lives on
            with pytest.raises(CNIError):
                await asyncio.to_thread(call, path, req("DEL"))
    asyncio.run(body())
    assert "cancelled from below" in caplog.text


def test_garbage_on_the_socket_gets_an_error_and_the_server_lives_on(tmp_path):
    path = str(tmp_path / "agent.sock")

    def garbage():
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"\x00\x00\x00\x05hello")
        reply, _ = recv_msg(s)
        s.close()
        return reply

    async def body():
        rec = Recorder()
        async with LocalAPI(path, rec):
            reply = await asyncio.to_thread(garbage)
            assert reply["ok"] is False and reply["code"] == DECODE_FAILURE
            assert await asyncio.to_thread(call, path, req("DEL")) == {"cniVersion": "1.1.0", "echo": "abc123"}
        assert rec.seen == [("DEL", "abc123", False)]
    asyncio.run(body())


def test_requests_are_served_concurrently(tmp_path):
    """Ten handlers must all be inside handle() at once to pass the barrier: a server
    that served one request at a time would never answer (and the test times out)."""
    path = str(tmp_path / "agent.sock")

    async def body():
        rec = Recorder(barrier=asyncio.Barrier(10))
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(10) as clients:  # one thread per client
            async with LocalAPI(path, rec):
                res = await asyncio.wait_for(asyncio.gather(
                    *(loop.run_in_executor(clients, call, path, req("DEL", container_id=f"c{i}"))
                      for i in range(10))), 30)
        assert sorted(r["echo"] for r in res) == sorted(f"c{i}" for i in range(10))
    asyncio.run(body())


def test_received_fds_are_always_closed(tmp_path):
    path = str(tmp_path / "agent.sock")

    def send_with_fds(request, n):
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(n)]
        try:
            try:
                return call(path, request, tuple(fds))
            except CNIError as e:
                return e.code
        finally:
            for fd in fds:
                os.close(fd)

    async def body():
        rec = Recorder()
        async with LocalAPI(path, rec):
            await asyncio.to_thread(send_with_fds, req("DEL"), 1)  # warm up threads and imports
            before = open_fds()
            # Good request, refused request (ADD with a non-netns fd), extra fds, failing handler.
            assert (await asyncio.to_thread(send_with_fds, req("DEL"), 1))["echo"] == "abc123"
            assert await asyncio.to_thread(send_with_fds, req("ADD"), 1) == INVALID_ENV
            assert (await asyncio.to_thread(send_with_fds, req("DEL"), 3))["echo"] == "abc123"
            rec.fail = RuntimeError("x")
            assert await asyncio.to_thread(send_with_fds, req("DEL"), 2) == INTERNAL
            after = open_fds()
        extra = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in after - before if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not extra
    asyncio.run(body())


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path):
    path = str(tmp_path / "agent.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # a dead agent's socket file: nobody listens

    async def body():
        async with LocalAPI(path, Recorder()):
            with pytest.raises(RuntimeError, match="another agent"):
                await LocalAPI(path, Recorder()).start()
            assert await asyncio.to_thread(call, path, req("DEL"))  # the first still serves
    asyncio.run(body())
    (tmp_path / "file").write_text("x")
    with pytest.raises(RuntimeError, match="not a socket"):
        asyncio.run(LocalAPI(str(tmp_path / "file"), Recorder()).start())


def test_status_reports_ipam_availability(tmp_path):
    """STATUS through the real CNIService and IPAM (no plumbing involved)."""
    path = str(tmp_path / "agent.sock")

    async def body():
        for cidrs, ok in ((["10.244.0.0/24"], True), ([], False)):
            ipam = IPAM("node1", PodCIDRBackend("node1", cidrs), str(tmp_path / f"ipam{ok}"))
            await ipam.start()
            svc = CNIService(ipam, None, "node1", None, plumbing=object())
            async with LocalAPI(path, svc):
                if ok:
                    assert await asyncio.to_thread(call, path, {"command": "STATUS", "config": CONF}) == {}
                else:
                    with pytest.raises(CNIError, match="no podCIDR") as ei:
                        await asyncio.to_thread(call, path, {"command": "STATUS", "config": CONF})
                    assert ei.value.code == PLUGIN_NOT_AVAILABLE
                # A delegated IPAM plugin answers STATUS itself.
                other = {**CONF, "ipam": {"type": "host-local"}}
                assert await asyncio.to_thread(call, path, {"command": "STATUS", "config": other}) == {}
            await ipam.close()
    asyncio.run(body())
