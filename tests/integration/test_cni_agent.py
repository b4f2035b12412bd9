"""The binary's agent path: `ipam.type: tortie` (and `agent_socket` with host-local),
against a FAKE AGENT defined in this file.  The fake stands in for the node agent's local
API (felix_agent/agent/localapi.py, built separately): it answers the wire protocol of
podnet/agent_protocol.py from a thread pool, allocates with host-local (standing in
for the agent's own IPAM) and wires pods with podnet.plumbing on the netns fd the
binary sent — so the binary's whole agent path, fd passing included, really runs."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab.cni_runtime import Attachment, invoke

from tests.integration.test_cni_helpers import CNI_DIR, ROOT, make_net, pod_ip, runner, tortie_binary  # noqa: F401

pytestmark = pytest.mark.root


# --- the fake agent (runs as its own process inside the node namespace) ----------------

def fake_agent_main(argv: list[str]) -> None:
    from podnet import naming, plumbing
    from podnet.agent_protocol import recv_msg, send_msg
    from podnet.errors import CNIError
    from podnet.result import Result

    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--subnet", required=True)
    ap.add_argument("--journal", required=True)
    a = ap.parse_args(argv)
    journal_lock = threading.Lock()

    def host_local(command: str, req: dict) -> dict | None:
        conf = {"cniVersion": "1.0.0", "name": req["config"]["name"],
                "ipam": {"type": "host-local", "dataDir": a.data_dir, "ranges": [[{"subnet": a.subnet}]]}}
        att = Attachment(req["container_id"], req.get("netns", ""), req["ifname"])
        r = invoke([os.path.join(CNI_DIR, "host-local")], command, conf, att, cni_path=CNI_DIR)
        if not r.ok:
            raise CNIError(r.output.get("code", 999) if r.output else 999, f"host-local: {r.stdout}")
        return r.output

    def handle(req: dict, fds: list[int]) -> dict:
        cmd = req["command"]
        if cmd in ("STATUS", "GC"):
            return {}
        args = req.get("args", {})
        host = naming.host_iface_for(args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"),
                                     req["container_id"], req["ifname"])
        if cmd == "ADD":
            ips = req.get("ips")
            allocated = ips is None
            if allocated:
                ips = [i["address"].split("/")[0] + "/32" for i in host_local("ADD", req)["ips"]]
            try:
                info = plumbing.setup(fds[0], req["ifname"], host, ips, req["config"].get("mtu", 1500),
                                      sandbox=req["netns"])
            except BaseException:
                if allocated:
                    host_local("DEL", req)
                raise
            return {"cniVersion": "1.1.0",
                    "interfaces": [{"name": host, "mac": info["host_mac"]},
                                   {"name": req["ifname"], "mac": info["container_mac"], "sandbox": info["sandbox"]}],
                    "ips": [{"address": ip, "interface": 1} for ip in ips],
                    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]}
        if cmd == "DEL":
            plumbing.teardown(None, req["ifname"], host)
            if "ips" not in req:
                host_local("DEL", req)
            return {}
        if cmd == "CHECK":
            ips = req.get("ips") or [i.address for i in Result.from_dict(req["config"]["prevResult"]).ips]
            plumbing.check(fds[0], req["ifname"], host, ips)
            return {}
        raise CNIError(4, f"unknown command {cmd}")

    def serve(conn: socket.socket) -> None:
        with conn:
            req, fds = recv_msg(conn)
            try:
                reply = {"ok": True, "result": handle(req, fds)}
            except CNIError as e:
                reply = {"ok": False, "code": e.code, "msg": e.msg, "details": e.details}
            finally:
                for fd in fds:
                    os.close(fd)
            with journal_lock, open(a.journal, "a") as j:
                j.write(json.dumps({"command": req["command"], "fds": len(fds), "ips": req.get("ips"),
                                    "thread_netns": os.readlink("/proc/thread-self/ns/net"),
                                    "ok": reply["ok"]}) + "\n")
            send_msg(conn, reply)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(a.socket)
    listener.listen(64)
    with ThreadPoolExecutor(max_workers=8) as pool:
        while True:
            conn, _ = listener.accept()
            pool.submit(serve, conn)


# --- fixtures ------------------------------------------------------------------------------

class FakeAgent:
    def __init__(self, lab, node_ns: str, tmp) -> None:
        self.socket = str(tmp / "agent.sock")
        self.data_dir = str(tmp / "agent-ipam")
        self.journal = str(tmp / "agent-journal.jsonl")
        self.subnet = "10.250.0.0/24"
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); "
                "from tests.integration.test_cni_agent import fake_agent_main; fake_agent_main(sys.argv[1:])")
        self.proc = lab.popen(node_ns, [sys.executable, "-c", code, "--socket", self.socket, "--data-dir",
                                        self.data_dir, "--subnet", self.subnet, "--journal", self.journal],
                              stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fake agent did not start: " + (self.proc.stderr.read() or b"").decode())
            time.sleep(0.05)

    def entries(self) -> list[dict]:
        if not os.path.exists(self.journal):
            return []
        return [json.loads(line) for line in open(self.journal)]

    def allocated(self) -> list[str]:
        d = os.path.join(self.data_dir, "k8s-pod-network")
        return [n for n in os.listdir(d) if n[0].isdigit()] if os.path.isdir(d) else []


@pytest.fixture
def agent_net(make_lab, tmp_path, request):
    lab = make_lab(1)
    net = make_net(lab, tmp_path, [request.getfixturevalue("tortie_binary")])
    agent = FakeAgent(lab, net.node_ns, tmp_path)
    net.extra = {"ipam": {"type": "tortie"}, "agent_socket": agent.socket}
    return net, agent


def node_netns_id(net) -> str:
    return net.lab.exec(net.node_ns, "readlink", "/proc/self/ns/net").stdout.strip()


# --- tests ---------------------------------------------------------------------------------

def test_tortie_ipam_through_the_agent(agent_net, runner):
    net, agent = agent_net
    net.argv = runner
    pod = net.lab.add_pod_ns("ag")
    att, res = net.add(pod, "ag")
    ip = pod_ip(res)
    assert ip.startswith("10.250.0.") and res["cniVersion"] == "1.0.0"
    assert "mtu" not in res["interfaces"][1]  # the agent's 1.1.0 result, converted to 1.0.0
    assert net.lab.ping(net.node_ns, ip) and net.lab.ping(pod, net.lab.nodes[0].ip)
    add = agent.entries()[0]
    assert add["command"] == "ADD" and add["fds"] == 1 and add["ips"] is None and add["ok"]
    assert net.records() == []  # the agent owns the state on this path
    assert net.run("CHECK", att, net.conf(prevResult=res)).ok
    assert net.run("DEL", att).ok and net.run("DEL", att).ok
    assert [e["command"] for e in agent.entries()] == ["ADD", "CHECK", "DEL", "DEL"]
    assert agent.allocated() == []
    net.assert_nothing_left()


def test_agent_errors_come_back_with_their_code(agent_net):
    net, agent = agent_net
    pod = net.lab.add_pod_ns("dup")
    net.lab.exec(pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x0")
    r = net.run("ADD", net.attachment(pod, "dup"))
    assert r.returncode != 0 and r.output["code"] == 100 and "already exists" in r.output["msg"]
    assert agent.allocated() == []
    net.assert_nothing_left()


def test_host_local_ipam_with_an_agent_sends_ips(agent_net):
    net, agent = agent_net
    net.extra = {"agent_socket": agent.socket}  # IPAM host-local in the binary, wiring in the agent
    pod = net.lab.add_pod_ns("ips")
    att, res = net.add(pod, "ips")
    ip = pod_ip(res)
    assert ip.startswith("10.244.1.") and net.allocated() == [ip]
    assert agent.entries()[0]["ips"] == [f"{ip}/32"] and agent.entries()[0]["fds"] == 1
    assert net.lab.ping(net.node_ns, ip)
    assert net.run("CHECK", att, net.conf(prevResult=res)).ok
    assert net.run("DEL", att).ok
    net.assert_nothing_left()


def test_agent_missing_is_11_and_nothing_is_left(make_lab, tmp_path, tortie_binary):
    lab = make_lab(1)
    net = make_net(lab, tmp_path, [tortie_binary])
    pod = lab.add_pod_ns("noag")
    for extra in ({"ipam": {"type": "tortie"}, "agent_socket": str(tmp_path / "no-agent.sock")},
                  {"agent_socket": str(tmp_path / "no-agent.sock")}):  # host-local: allocated, then released
        net.extra = extra
        r = net.run("ADD", net.attachment(pod, "noag"))
        assert r.returncode != 0 and r.output["code"] == 11, r.stdout
        assert "not reachable" in r.output["msg"]
        net.assert_nothing_left()
        assert "eth0" not in lab.exec(pod, "ip", "link").stdout


def test_concurrent_adds_through_the_agents_worker_threads(agent_net):
    """The fake agent runs plumbing from 8 worker threads at once; every thread ends in
    the node's namespace (setns is per thread and always undone)."""
    net, agent = agent_net
    pods = [net.lab.add_pod_ns(f"t{i}") for i in range(12)]
    atts = [net.attachment(ns, f"t{i}") for i, ns in enumerate(pods)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        runs = list(pool.map(lambda a: net.run("ADD", a), atts))
    assert all(r.ok for r in runs), [r.stdout for r in runs if not r.ok]
    ips = [pod_ip(r.output) for r in runs]
    assert len(set(ips)) == 12 and all(net.lab.ping(net.node_ns, ip) for ip in ips)
    node_ns = node_netns_id(net)
    assert {e["thread_netns"] for e in agent.entries()} == {node_ns}
    with ThreadPoolExecutor(max_workers=12) as pool:
        assert all(r.ok for r in pool.map(lambda a: net.run("DEL", a), atts))
    assert agent.allocated() == []
    net.assert_nothing_left()


def test_agent_path_imports_no_pyroute2(agent_net):
    """A real ADD through the agent with `python -X importtime`: pyroute2, kubernetes,
    grpc, aetcd and yaml are never imported on this path."""
    net, agent = agent_net
    pod = net.lab.add_pod_ns("imp")
    att = net.attachment(pod, "imp")
    r = invoke([sys.executable, "-X", "importtime", "-m", "cni_plugin"], "ADD", net.conf(), att, net.node_ns)
    assert r.ok, r.stdout
    modules = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()
               if line.startswith("import time:")}
    assert "cni_plugin" in modules
    assert not modules & {"pyroute2", "kubernetes", "grpc", "aetcd", "yaml", "felix_agent"}
    assert net.run("DEL", att).ok
    net.assert_nothing_left()


def test_status_and_gc_through_the_agent(agent_net):
    net, agent = agent_net
    net.version = "1.1.0"
    assert net.run("STATUS", None).ok
    gc = net.conf(**{"cni.dev/valid-attachments": [{"containerID": "c-x", "ifname": "eth0"}]})
    assert net.run("GC", None, gc).ok
    assert [e["command"] for e in agent.entries()] == ["STATUS", "GC"]
    agent.proc.kill()
    agent.proc.wait()
    os.unlink(agent.socket)
    r = net.run("STATUS", None)
    assert r.returncode != 0 and r.output["code"] == 50
