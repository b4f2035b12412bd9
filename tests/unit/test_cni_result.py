"""Results across spec versions: 0.3.x/0.4.0 ips carry "version", 1.x do not, and the
1.1.0 fields appear only in 1.1.0 output."""
import pytest

from podnet.result import Result, ResultError
from podnet.versions import SUPPORTED_VERSIONS, at_least

V11 = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "cali0", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1400},
                   {"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/p", "mtu": 1400,
                    "socketPath": "/s", "pciID": "0000:00:01.0"}],
    "ips": [{"address": "10.0.0.5/32", "interface": 1}, {"address": "fd00::5/128", "interface": 1,
                                                          "gateway": "fd00::1"}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1300, "table": 100}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
}
V04 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/p"}],
    "ips": [{"version": "4", "address": "10.1.0.2/24", "gateway": "10.1.0.1", "interface": 0},
            {"version": "6", "address": "fd00::2/64"}],
    "routes": [{"dst": "0.0.0.0/0"}],
}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_output_has_ip_versions_and_no_11_fields(version):
    out = Result.from_dict(V11).to_dict(version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert "mtu" not in out["interfaces"][0] and "socketPath" not in out["interfaces"][1]
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]


def test_100_output_drops_versions_and_11_fields():
    out = Result.from_dict(V11).to_dict("1.0.0")
    assert all("version" not in ip for ip in out["ips"])
    assert "mtu" not in out["interfaces"][1] and "pciID" not in out["interfaces"][1]
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]


def test_110_round_trip_is_exact():
    assert Result.from_dict(V11).to_dict("1.1.0") == V11


def test_legacy_input_converts_up():
    out = Result.from_dict(V04).to_dict("1.1.0")
    assert out["ips"] == [{"interface": 0, "address": "10.1.0.2/24", "gateway": "10.1.0.1"},
                          {"address": "fd00::2/64"}]
    assert Result.from_dict(V04).to_dict("0.4.0") == V04


@pytest.mark.parametrize("bad", [
    [], {"ips": "x"}, {"ips": [{"address": "10.0.0.1"}]}, {"ips": [{"address": "10.0.0.1/32", "version": "6"}]},
    {"ips": [{"address": "10.0.0.1/32", "interface": 0}]}, {"interfaces": [{"mac": "x"}]},
    {"routes": [{"gw": "1.2.3.4"}]}, {"routes": [{"dst": "0.0.0.0/0", "gw": "nope"}]},
    {"dns": {"nameservers": "8.8.8.8"}}, {"ips": [{"address": "10.0.0.1/32", "interface": True}]},
])
def test_bad_results_rejected(bad):
    with pytest.raises(ResultError):
        Result.from_dict(bad)


def test_chaining_shifts_interface_indices():
    prev = Result.from_dict(V04)
    ours = Result.from_dict(V11)
    merged = ours.merged_after(prev).to_dict("1.0.0")
    assert [i["name"] for i in merged["interfaces"]] == ["eth0", "cali0", "eth0"]
    assert [ip.get("interface") for ip in merged["ips"]] == [0, None, 2, 2]
    assert merged["dns"] == {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}


def test_sandbox_ips_selects_the_pod_interface():
    r = Result.from_dict(V11)
    assert [i.address for i in r.sandbox_ips("eth0")] == ["10.0.0.5/32", "fd00::5/128"]
    assert r.sandbox_ips("net1") == []


def test_version_order():
    assert list(SUPPORTED_VERSIONS) == sorted(SUPPORTED_VERSIONS, key=lambda v: tuple(map(int, v.split("."))))
    assert at_least("1.1.0", "0.4.0") and not at_least("0.3.1", "0.4.0")
