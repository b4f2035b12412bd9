"""tortiectl trace's argument handling (a clear error for what it cannot answer) and the
status view's datastore notes."""
import pytest

from felix_agent.calc.trace import trace
from tests.unit.test_calc_fixtures import cluster_of, pod
from tortiectl.errors import CliError
from tortiectl.trace import parse_port, render, resolve


def test_resolve_pods_addresses_and_errors():
    c = cluster_of(pod("x", "a", "10.0.0.2"), pod("x", "b", "10.0.0.3"))
    assert resolve(c, "x/a", "source").key == "x/a"
    assert resolve(c, "10.0.0.3", "destination").key == "x/b"  # a pod's address is that pod
    assert resolve(c, "192.0.2.1", "destination") == "192.0.2.1"
    with pytest.raises(CliError, match="source pod x/nope not found"):
        resolve(c, "x/nope", "source")
    with pytest.raises(CliError, match="neither <namespace>/<pod> nor an IP address"):
        resolve(c, "nope", "source")
    assert parse_port("53/udp") == (53, "udp") and parse_port("80") == (80, "tcp")
    with pytest.raises(CliError, match="must be <number>/<protocol>"):
        parse_port("http/tcp")


def test_render_names_the_verdict():
    c = cluster_of(pod("x", "a", "10.0.0.2"), pod("x", "b", "10.0.0.3"))
    out = render(trace(c, resolve(c, "x/a", "s"), resolve(c, "x/b", "d"), 80, "tcp"))
    assert out.splitlines()[0] == "x/a -> x/b 80/tcp: ALLOWED"
    assert "no policy selects x/b for ingress: default allow" in out


def test_status_shows_the_datastore_notes():
    """The agent's notes (a network-policy-api CRD not installed) are one line each."""
    from tortiectl.status import render_status
    st = {"node": "n1", "node_ip": "192.168.100.11", "datastore": "kubernetes", "in_sync": True,
          "datastore_notes": ["ClusterNetworkPolicy: the CRD clusternetworkpolicies.policy.networking.k8s.io "
                              "is not installed (or does not serve v1alpha2): ClusterNetworkPolicy objects are "
                              "not enforced"], "endpoints": [], "bgp_peers": []}
    out = render_status(st)
    assert "Datastore note:   ClusterNetworkPolicy: the CRD clusternetworkpolicies" in out, out
