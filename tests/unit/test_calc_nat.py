"""nat table: floating IPs and natOutgoing."""
from felix_agent.model import IPPool, Node
from tests.unit.test_calc_fixtures import cluster_of, pod, state


def nat(c, errors=None):
    return state(c, errors=errors).chains["nat"]


def test_nat_layout():
    n = nat(cluster_of())
    assert n["cali-PREROUTING"] == ("-j cali-fip-dnat",)
    assert n["cali-OUTPUT"] == ("-j cali-fip-dnat",)
    assert n["cali-POSTROUTING"] == ("-j cali-fip-snat", "-j cali-nat-outgoing")
    assert n["cali-fip-dnat"] == n["cali-fip-snat"] == n["cali-nat-outgoing"] == ()


def test_floating_ips_of_local_pods_only():
    c = cluster_of(pod("ns", "web", "10.0.0.5", fips='["172.16.0.1", "172.16.0.2", "fd00::1"]'),
                   pod("ns", "far", "10.0.1.5", node="n2", fips='["172.16.0.9"]'))
    n = nat(c)
    assert n["cali-fip-dnat"] == ("-d 172.16.0.1/32 -j DNAT --to-destination 10.0.0.5",
                                  "-d 172.16.0.2/32 -j DNAT --to-destination 10.0.0.5")
    # hairpin: the pod reaching its own floating IP sees the reply come from that IP
    assert n["cali-fip-snat"] == ("-s 10.0.0.5/32 -d 10.0.0.5/32 -j SNAT --to-source 172.16.0.1",
                                  "-s 10.0.0.5/32 -d 10.0.0.5/32 -j SNAT --to-source 172.16.0.2")


def test_floating_ip_problems_are_reported_and_skipped():
    c = cluster_of(pod("ns", "a", "10.0.0.5", fips='["172.16.0.1", "bogus"]'),
                   pod("ns", "b", "10.0.0.6", fips='["172.16.0.1"]'),
                   pod("ns", "c", "10.0.0.7", fips="{oops"))
    errors = []
    n = nat(c, errors)
    assert n["cali-fip-dnat"] == ("-d 172.16.0.1/32 -j DNAT --to-destination 10.0.0.5",)
    text = "\n".join(errors)
    assert "ns/a: floating IP 'bogus'" in text
    assert "ns/b: floating IP 172.16.0.1 is already used by ns/a" in text
    assert "ns/c: annotation tortie.io/floatingIPs is not JSON" in text


def test_nat_outgoing():
    c = cluster_of(IPPool("masq", "10.65.0.0/16", nat_outgoing=True),
                   IPPool("plain", "10.66.0.0/16"),
                   IPPool("old", "10.67.0.0/16", nat_outgoing=True, disabled=True),
                   IPPool("v6", "fd00:65::/48", nat_outgoing=True),
                   Node("n1", "192.168.100.11/24", vxlan_tunnel_addr="10.65.0.1"),
                   Node("n2", "192.168.100.12/24"))
    st = state(c)
    assert st.chains["nat"]["cali-nat-outgoing"] == (
        "-m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst "
        "-m set ! --match-set cali40all-hosts-net dst -j MASQUERADE",)
    assert st.ipsets["cali40masq-ipam-pools"].members == {"10.65.0.0/16", "10.67.0.0/16"}
    assert st.ipsets["cali40all-ipam-pools"].members == {"10.65.0.0/16", "10.66.0.0/16", "10.67.0.0/16"}
    assert st.ipsets["cali40all-hosts-net"].members == {"192.168.100.11", "192.168.100.12", "10.65.0.1"}


def test_no_nat_outgoing_pool_no_masquerade():
    st = state(cluster_of(IPPool("plain", "10.66.0.0/16")))
    assert st.chains["nat"]["cali-nat-outgoing"] == ()
    assert st.ipsets["cali40masq-ipam-pools"].members == frozenset()


def test_bad_pool_cidr_is_reported():
    errors = []
    st = state(cluster_of(IPPool("bad", "10.0.0.0/40", nat_outgoing=True)), errors=errors)
    assert st.ipsets["cali40all-ipam-pools"].members == frozenset()
    assert any("pool bad" in e for e in errors)
