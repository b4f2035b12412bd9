"""Corrupt datastore records (root, netns lab, real etcd and agent): garbage under this
node's own endpoint prefix, under another node's, and an invalid Pod.  Each is counted in
tortie_errors_total{kind="datastore_decode"}, shown in /status (last_error, bad_records)
and `tortiectl status`; the agent removes the garbage under its own prefix only (it is the
only writer there) and leaves the others' alone.  They used to show in a log warning only."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.lab.cluster import VENV_BIN, LabCluster, wait_for
from tests.lab.netns import sh

pytestmark = pytest.mark.root

ENV = {**os.environ, "ETCDCTL_API": "3"}


def etcdctl(c: LabCluster, *args: str) -> str:
    p = subprocess.run(["etcdctl", f"--endpoints={c.etcd.endpoint}", *args], capture_output=True, text=True,
                       env=ENV, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def decode_errors(c: LabCluster, node: str) -> float:
    _, body = c.http(node, "/metrics")
    m = re.search(r'^tortie_errors_total\{kind="datastore_decode"\} ([0-9.e+]+)$', body, re.M)
    return float(m.group(1)) if m else -1.0


def test_corrupt_records_are_counted_shown_and_own_ones_removed(make_cluster):
    c = make_cluster(1)
    node = "node1"
    pod = c.add_pod("default", "ok", node)
    assert decode_errors(c, node) == 0.0
    own = "/tortie/workloadendpoints/node1/default/junk"
    other = "/tortie/workloadendpoints/node9/default/junk"
    etcdctl(c, "put", own, "{this is not json")
    etcdctl(c, "put", other, "[1, 2, garbage")
    etcdctl(c, "put", "/tortie/pods/default/bad", '{"apiVersion": "v1", "kind": "Pod", "metadata": {}}')

    wait_for(lambda: not etcdctl(c, "get", own, "--keys-only").strip(), what="own garbage removed")
    wait_for(lambda: decode_errors(c, node) >= 3, what="decode errors counted")
    st = c.status(node)
    keys = {b["key"] for b in st["bad_records"]}
    assert keys == {other, "/tortie/pods/default/bad"}, st["bad_records"]
    assert "could not be decoded" in st["last_error"]
    assert etcdctl(c, "get", other, "--keys-only").strip() == other, "another node's key was touched"
    out = sh(os.path.join(VENV_BIN, "tortiectl"), "status", ns=c.lab.node(node).ns).stdout
    assert "Bad records:      2" in out and "could not be decoded" in out, out
    # the node's valid endpoint is untouched
    assert etcdctl(c, "get", "/tortie/workloadendpoints/node1/default/ok", "--keys-only").strip()

    # Cleaned up by hand: the status clears.
    etcdctl(c, "del", other)
    etcdctl(c, "del", "/tortie/pods/default/bad")
    wait_for(lambda: not c.status(node)["bad_records"], what="bad records cleared")
    assert "could not be decoded" not in c.status(node)["last_error"]
    assert c.agents[node].poll() is None
    c.del_pod(pod)
