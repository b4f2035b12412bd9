"""A conflist as libcni runs it: tortie, then Debian's portmap (capabilities
portMappings -> runtimeConfig, tortie's result -> portmap's prevResult).  A hostPort on
node 1 reaches the pod from node 2."""
import subprocess

import pytest

from tests.lab.cni_runtime import ConfList
from tests.lab import tcp_probe

from tests.integration.test_cni_helpers import make_net, pod_ip, require_cni_plugins, tortie_binary  # noqa: F401

pytestmark = pytest.mark.root

SERVER = ("import socket,sys\n"
          "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(8)\n"
          "print('ready', flush=True)\n"
          "while True:\n c,_=s.accept(); c.sendall(b'hi'); c.close()\n")


def test_tortie_then_portmap(make_lab, tmp_path, tortie_binary):
    require_cni_plugins("portmap", "host-local")
    lab = make_lab(2)
    node1, node2 = lab.nodes
    pod = lab.add_pod_ns("hp")
    net = make_net(lab, tmp_path, [tortie_binary], version="1.0.0")  # Debian's portmap speaks <= 1.0.0
    member = net.conf()
    for k in ("cniVersion", "name"):
        member.pop(k)
    chain = ConfList({"cniVersion": "1.0.0", "name": net.name, "plugins": [
        member, {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}]},
        executables={"tortie": [tortie_binary]})
    rc = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    att = net.attachment(pod, "hp")

    result = chain.add(att, node1.ns, rc)
    # portmap passed our result through: it saw it as prevResult.
    assert result["interfaces"][1]["name"] == "eth0" and result["interfaces"][1]["sandbox"]
    ip = pod_ip(result)
    srv = lab.popen(pod, ["python3", "-c", SERVER, "80"], stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"

    assert tcp_probe(lab, node2.ns, node1.ip, 8080)  # DNAT node1:8080 -> pod:80
    assert not tcp_probe(lab, node2.ns, node1.ip, 8081)  # the probe can fail
    assert "CNI-HOSTPORT-DNAT" in lab.exec(node1.ns, "iptables-save", "-t", "nat").stdout
    # CHECK of our member with the chain's final result (Debian's portmap 1.1.1 CHECK
    # looks for an IPv6 chain it never made, so the whole list is not CHECKed here).
    assert net.run("CHECK", att, net.conf(prevResult=result)).ok

    chain.delete(att, node1.ns, rc, prev=result)
    assert not tcp_probe(lab, node2.ns, node1.ip, 8080)
    assert ip not in lab.exec(node1.ns, "iptables-save", "-t", "nat").stdout
    net.assert_nothing_left()
