"""The netns lab itself: nodes on one segment, two subnets through a router, cleanup."""
import pytest

from tests.lab import Etcd, Lab, list_namespaces, new_prefix, tcp_probe

pytestmark = pytest.mark.root

TCP_SERVER = ("import socket,sys\n"
              "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(8)\n"
              "print('ready', flush=True)\n"
              "while True:\n c,_=s.accept(); c.sendall(b'hi'); c.close()\n")


def start_tcp_server(lab, ns, port):
    import subprocess
    p = lab.popen(ns, ["python3", "-c", TCP_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_three_nodes_one_segment(make_lab):
    lab = make_lab(3)
    assert [n.ip for n in lab.nodes] == ["192.168.100.11", "192.168.100.12", "192.168.100.13"]
    start_tcp_server(lab, lab.nodes[2].ns, 8080)
    for a in lab.nodes:
        for b in lab.nodes:
            assert lab.ping(a.ns, b.ip), f"{a.name} cannot ping {b.name}"
        assert tcp_probe(lab, a.ns, lab.nodes[2].ip, 8080)
    # Nothing listens on 8081: the probe must say so (it can fail).
    assert not tcp_probe(lab, lab.nodes[0].ns, lab.nodes[2].ip, 8081)
    # Every node has a default route (proxy ARP for 169.254.1.1 depends on it).
    for n in lab.nodes:
        assert f"default via {n.gateway}" in lab.exec(n.ns, "ip", "route").stdout


def test_two_subnets_through_router(make_lab):
    lab = make_lab(2, two_subnets=True)
    a, b = lab.nodes
    assert a.ip.startswith("192.168.100.") and b.ip.startswith("192.168.200.")
    start_tcp_server(lab, b.ns, 8080)
    assert lab.ping(a.ns, b.ip) and lab.ping(b.ns, a.ip)
    assert tcp_probe(lab, a.ns, b.ip, 8080)
    # The path really crosses the router: one hop shows in the TTL of the reply.
    out = lab.exec(a.ns, "ping", "-n", "-c", "1", b.ip).stdout
    assert "ttl=63" in out


def test_teardown_removes_everything(lab_prefix):
    prefix = new_prefix("tx")
    lab = Lab(prefix=prefix).build(2)
    pod = lab.add_pod_ns("p1")
    p = lab.popen(lab.nodes[0].ns, ["sleep", "300"])
    assert pod in list_namespaces()
    lab.teardown()
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]
    assert p.poll() is not None


class _Boom(Exception):
    pass


def test_cleanup_after_failing_body():
    """A test body that fails half-way still leaves nothing behind."""
    prefix = new_prefix("tf")
    with pytest.raises(_Boom):
        with Lab(prefix=prefix) as lab:
            lab.build(2)
            lab.add_pod_ns("doomed")
            raise _Boom()
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]


def test_etcd_put_get_with_aetcd_from_node_namespace(make_lab):
    """Real etcd on loopback, written through aetcd from the root namespace and read
    from inside a node namespace through the lab's loopback forwarder."""
    import asyncio
    import aetcd

    lab = make_lab(1)
    with Etcd() as e:
        async def put_get():
            async with aetcd.Client(host="127.0.0.1", port=e.port) as c:
                await c.put(b"/tortie/test", b"hello")
                return (await c.get(b"/tortie/test")).value
        assert asyncio.run(put_get()) == b"hello"
        lab.forward_loopback(lab.nodes[0].ns, 2379, e.port)
        code = ("import asyncio,aetcd\n"
                "async def m():\n"
                " async with aetcd.Client(host='127.0.0.1', port=2379) as c:\n"
                "  print((await c.get(b'/tortie/test')).value.decode())\n"
                "asyncio.run(m())\n")
        import sys
        out = lab.exec(lab.nodes[0].ns, sys.executable, "-c", code).stdout.strip()
        assert out == "hello"
        e.stop()
        async def get_down():
            async with aetcd.Client(host="127.0.0.1", port=e.port, timeout=1) as c:
                await c.get(b"/tortie/test")
        with pytest.raises(Exception):
            asyncio.run(get_down())
