"""iptables backend detection in a lab node namespace."""
import os

import pytest

from felix_agent.dataplane.backend import BackendError, detect, detect_backend

pytestmark = pytest.mark.root


@pytest.fixture
def node(make_lab):
    lab = make_lab(1)
    return lab, lab.nodes[0].ns


def test_empty_node_gets_the_default(node):
    lab, ns = node
    d = detect(netns=ns)
    assert d.backend == "nft" and d.counts == {"nft": 0, "legacy": 0}
    assert detect_backend(netns=ns, default="legacy") == "legacy"


def test_picks_the_backend_that_holds_rules(node):
    lab, ns = node
    for i in range(3):  # e.g. kube-proxy in legacy mode
        lab.exec(ns, "iptables-legacy", "-A", "INPUT", "-s", f"10.0.0.{i}", "-j", "ACCEPT")
    d = detect(netns=ns)
    assert d.backend == "legacy" and d.counts["legacy"] == 3
    for i in range(4):  # IPv6 rules count too
        lab.exec(ns, "ip6tables-nft", "-A", "INPUT", "-s", f"2001:db8::{i}", "-j", "ACCEPT")
    assert detect_backend(netns=ns) == "nft"
    # Config wins over what is there.
    assert detect_backend(netns=ns, configured="legacy") == "legacy"


def test_missing_backend_tools_named(node, tmp_path, monkeypatch):
    lab, ns = node
    # A PATH holding everything but the legacy tools.
    for d in os.environ["PATH"].split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if "legacy" not in name and not (tmp_path / name).exists():
                (tmp_path / name).symlink_to(os.path.join(d, name))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match="iptables-legacy-save, iptables-legacy-restore"):
        detect(netns=ns, configured="legacy")
    d = detect(netns=ns)
    assert d.backend == "nft" and d.reason == "the only backend installed"
