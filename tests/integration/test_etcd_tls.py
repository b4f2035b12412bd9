"""etcd over TLS with client-certificate auth (etcd --client-cert-auth), with throwaway
certificates made by the openssl CLI: the agent and tortiectl work over it, a wrong CA, a
missing or expired client certificate fail with a message naming the problem, etcd refuses
plaintext, and nothing the agent writes crosses the wire in the clear."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.lab import Etcd, Lab, sh
from tests.lab.certs import make_certs
from tests.lab.cluster import VENV_BIN, LabCluster, wait_for
from tests.lab.tools import is_root

pytestmark = pytest.mark.root

POOL_DOC = '{"apiVersion":"tortie.io/v1","kind":"IPPool","metadata":{"name":"tls"},"spec":{"cidr":"10.66.0.0/16"}}'


@pytest.fixture(scope="module")
def tls_cluster(lab_prefix, tmp_path_factory):
    if not is_root():
        pytest.skip("needs root for network namespaces")
    work = tmp_path_factory.mktemp("etcdtls")
    certs = make_certs(str(work / "certs"))
    etcd = Etcd(certs=certs)
    lab = Lab(prefix=f"{lab_prefix}-tls")
    try:
        etcd.start()
        lab.build(1)
        c = LabCluster(lab, etcd, str(work / "cluster"))
        yield c
    finally:
        lab.teardown()
        etcd.close()


def ctl(c: LabCluster, *args: str, endpoint: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(VENV_BIN, "tortiectl"), "--etcd-endpoints", endpoint or c.etcd.endpoint,
                           *args], capture_output=True, text=True, input=input, timeout=60)


def tls_args(c: LabCluster, ca: str | None = None, cert: tuple[str, str] | None = None) -> list[str]:
    certs = c.etcd.certs
    args = ["--etcd-ca-file", ca or certs.ca]
    if cert:
        args += ["--etcd-cert-file", cert[0], "--etcd-key-file", cert[1]]
    return args


def test_tortiectl_over_tls_and_what_it_says_when_tls_is_wrong(tls_cluster: LabCluster):
    c, certs = tls_cluster, tls_cluster.etcd.certs
    ok = ctl(c, *tls_args(c, cert=certs.client), "apply", "-f", "-", input=POOL_DOC)
    assert ok.returncode == 0 and "ippool/tls" in ok.stdout, ok.stderr
    got = ctl(c, *tls_args(c, cert=certs.client), "get", "ippools")
    assert got.returncode == 0 and "10.66.0.0/16" in got.stdout, got.stderr

    wrong_ca = ctl(c, *tls_args(c, ca=certs.other_ca, cert=certs.client), "get", "ippools")
    assert wrong_ca.returncode == 1
    assert f"server certificate is not signed by the CA in {certs.other_ca}" in wrong_ca.stderr, wrong_ca.stderr

    no_cert = ctl(c, *tls_args(c), "get", "ippools")
    assert no_cert.returncode == 1
    assert "requires a client certificate; set etcd_cert_file and etcd_key_file" in no_cert.stderr, no_cert.stderr

    expired = ctl(c, *tls_args(c, cert=certs.expired_client), "get", "ippools")
    assert expired.returncode == 1 and "the client certificate expired on" in expired.stderr, expired.stderr
    assert certs.expired_client[0] in expired.stderr

    # etcd listens for TLS only: a plaintext client gets nothing.
    plain = ctl(c, "get", "ippools", endpoint=f"127.0.0.1:{c.etcd.port}")
    assert plain.returncode == 1 and "10.66.0.0/16" not in plain.stdout
    assert "cannot reach etcd" in plain.stderr, plain.stderr

    mixed = ctl(c, *tls_args(c, cert=certs.client), "get", "ippools", endpoint=f"127.0.0.1:{c.etcd.port}")
    assert mixed.returncode == 1 and "write it as https://host:port" in mixed.stderr


def test_agent_over_tls_wires_a_pod_and_nothing_crosses_in_plaintext(tls_cluster: LabCluster, tmp_path):
    """The agent (in the node's namespace, reaching etcd through the node's 127.0.0.1:2379)
    syncs, claims a block and publishes a pod's endpoint over TLS; a capture of that port
    in the node's namespace holds none of the keys or values it wrote."""
    c = tls_cluster
    node = c.lab.nodes[0]
    c.apply_pool("10.66.0.0/16", name="tls")  # through LabCluster.tortiectl, over TLS
    c.lab.forward_loopback(node.ns, 2379, c.etcd.port)
    c._proxied.add(node.ns)
    pcap = str(tmp_path / "etcd.pcap")
    dump = c.lab.popen(node.ns, ["tcpdump", "-i", "lo", "-U", "-w", pcap, "tcp", "port", "2379"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(pcap), timeout=10, what="tcpdump")
    try:
        c.start_agent(node)
        pod = c.add_pod("default", "tls-pod", node.name)
        wait_for(lambda: "tls-pod" in ctl(c, *tls_args(c, cert=c.etcd.certs.client), "get",
                                          "workloadendpoints").stdout, what="the endpoint in etcd")
        assert c.http(node, "/readyz")[0] == 200
    finally:
        time.sleep(0.5)
        os.killpg(dump.pid, signal.SIGINT)
        dump.wait(timeout=10)
        c.stop_agent(node)
    with open(pcap, "rb") as f:
        wire = f.read()
    assert len(wire) > 5000, f"the capture saw only {len(wire)} bytes: not the agent's traffic"
    for secret in (b"/tortie/", b"tls-pod", pod.ip.encode(), b"10.66."):
        assert secret not in wire, f"{secret!r} crossed the wire in plaintext"


def test_agent_with_the_wrong_ca_says_so_and_an_expired_cert_stops_it(tls_cluster: LabCluster):
    c, certs = tls_cluster, tls_cluster.etcd.certs
    node = c.lab.nodes[0]
    p = c.start_agent(node, wait=False, extra=("--etcd-ca-file", certs.other_ca))
    try:
        wait_for(lambda: f"is not signed by the CA in {certs.other_ca}" in c.agent_log(node), timeout=30,
                 what="the agent naming the wrong CA")
        code, body = c.http(node, "/readyz")
        assert code == 503, body
        assert p.poll() is None  # it keeps retrying: a fixed CA file needs no restart
    finally:
        c.stop_agent(node)
    expired = c.start_agent(node, wait=False, extra=("--etcd-cert-file", certs.expired_client[0],
                                                      "--etcd-key-file", certs.expired_client[1]))
    assert expired.wait(timeout=30) == 2
    assert "configuration error: etcd_cert_file" in c.agent_log(node) and "expired on" in c.agent_log(node)
    c.agents.pop(node.name, None)


def test_the_readme_tls_example_works(tls_cluster: LabCluster):
    """README.md's tortiectl-over-TLS example, with the lab's endpoint and files."""
    from tests.integration.test_readme_examples import readme_commands
    c, certs = tls_cluster, tls_cluster.etcd.certs
    [example] = [cmd for cmd in readme_commands() if "--etcd-ca-file" in cmd]
    argv = example.split()
    assert argv[0] == "tortiectl" and argv[-3:] == ["get", "pods", "-A"], example
    files = {"--etcd-endpoints": f"https://127.0.0.1:{c.etcd.port}", "--etcd-ca-file": certs.ca,
             "--etcd-cert-file": certs.client[0], "--etcd-key-file": certs.client[1]}
    for i, a in enumerate(argv):
        if a in files:
            argv[i + 1] = files.pop(a)
    assert not files, f"the README example lost {sorted(files)}"
    p = subprocess.run([os.path.join(VENV_BIN, "tortiectl"), *argv[1:]], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (argv, p.stderr)
    assert p.stdout.split()[:3] == ["NAMESPACE", "NAME", "NODE"] or "No pods found" in p.stdout, p.stdout
