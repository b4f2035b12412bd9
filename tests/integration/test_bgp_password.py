"""BGP passwords (TCP MD5) between two real agents with BIRD: the same mesh password
establishes and carries pod traffic; a different one on one node takes the session down and
keeps it down, and the agent's status says why (the kernel's MD5 counters); the password
never shows in the agents' logs, /status, /metrics or bird.conf."""
from __future__ import annotations

import os
import re
import stat

import pytest

from tests.lab.cluster import LabCluster, wait_for

pytestmark = pytest.mark.root

SECRET = "tortie-Mesh-s3cret"
OTHER = "not-the-same-0ne"


def sessions(c: LabCluster, node: str) -> dict[str, str]:
    return {p["name"]: p["info"] for p in c.status(node)["bgp_peers"]}


def test_mesh_password_establishes_and_a_wrong_one_stays_down_with_the_reason(make_cluster):
    c: LabCluster = make_cluster(2, start=False, resync_interval=2.0)
    files = {}
    for n in c.lab.nodes:
        files[n.name] = os.path.join(c.node_dir(n), "bgp.pw")
        with open(files[n.name], "w") as f:
            f.write(SECRET + "\n")
        os.chmod(files[n.name], 0o600)
        c.start_agent(n, wait=False, extra=("--bgp-password-file", files[n.name]))
    for n in c.lab.nodes:
        c.wait_ready(n)
    mesh = "Mesh_" + c.lab.node("node2").ip.replace(".", "_")
    wait_for(lambda: sessions(c, "node1").get(mesh, "").startswith("Established"), timeout=60,
             what="the passworded session")
    a = c.add_pod("default", "a", "node1")
    b = c.add_pod("default", "b", "node2", serve=["tcp:80"])
    wait_for(lambda: c.probe(a, b.ip, 80), what="pod traffic over the passworded session")

    # The password is in BIRD's include file only (0600 in a 0700 directory).
    run = os.path.join(c.node_dir(c.lab.node("node1")), "run", "bird")
    include = os.path.join(run, "secrets", f"{mesh}.conf")
    with open(include) as f:
        assert f.read() == f'password "{SECRET}";\n'
    assert stat.S_IMODE(os.stat(include).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(include)).st_mode) == 0o700

    # node2 gets another password: the session goes down and stays down.
    with open(files["node2"], "w") as f:
        f.write(OTHER + "\n")
    wait_for(lambda: not sessions(c, "node1").get(mesh, "").startswith("Established"), timeout=30,
             what="the session to drop after the password change")
    info = wait_for(lambda: (lambda i: i if re.search(r"kernel: [1-9]\d* segments with a wrong signature", i)
                             else None)(sessions(c, "node1").get(mesh, "")), timeout=60,
                    what="node1's status naming the MD5 failures")
    assert "TCP MD5 password set" in info
    assert not sessions(c, "node2").get("Mesh_" + c.lab.node("node1").ip.replace(".", "_"), "").startswith(
        "Established")
    print(f"wrong password: node1 says {info!r}")

    # Nowhere else: logs, /status, /metrics, bird.conf.
    for n in c.lab.nodes:
        places = {"agent log": c.agent_log(n), "/status": c.http(n, "/status")[1],
                  "/metrics": c.http(n, "/metrics")[1]}
        with open(os.path.join(c.node_dir(n), "run", "bird", "bird.conf")) as f:
            places["bird.conf"] = f.read()
        assert "include" in places["bird.conf"]
        for where, text in places.items():
            for secret in (SECRET, OTHER):
                assert secret not in text, f"{n.name}: the password is in {where}"
