"""50 ADDs at once on one node (the built binary, host-local), then 50 DELs at once."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.test_cni_helpers import make_net, pod_ip, tortie_binary  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root

N = 50


def test_fifty_concurrent_adds_and_dels(make_lab, tmp_path, tortie_binary):
    lab = make_lab(1)
    node = lab.nodes[0]
    net = make_net(lab, tmp_path, [tortie_binary])
    pods = [lab.add_pod_ns(f"c{i}") for i in range(N)]
    atts = [net.attachment(ns, f"pod-{i}") for i, ns in enumerate(pods)]

    with ThreadPoolExecutor(max_workers=N) as pool:
        runs = list(pool.map(lambda a: net.run("ADD", a), atts))
    failed = [r.stdout or r.stderr for r in runs if not r.ok]
    assert not failed, failed[:3]
    ips = [pod_ip(r.output) for r in runs]
    assert len(set(ips)) == N
    assert sorted(net.allocated()) == sorted(ips)
    assert len(net.cali_links()) == N and len(net.host_routes()) == N
    # Every pod answers, from the node and to the node, at its own address.
    for ns, ip in zip(pods, ips):
        assert lab.ping(node.ns, ip), f"node cannot reach {ip}"
        assert f"inet {ip}/32 " in lab.exec(ns, "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert all(lab.ping(ns, node.ip) for ns in pods[:5])

    with ThreadPoolExecutor(max_workers=N) as pool:
        runs = list(pool.map(lambda a: net.run("DEL", a), atts))
    assert all(r.ok for r in runs), [r.stdout for r in runs if not r.ok][:3]
    net.assert_nothing_left()
