"""Bad input and failures half-way: the right CNI error code, and nothing left behind
(no veth, no host route, no attachment record, no address held in host-local's dataDir)."""
import json
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lab.cni_runtime import invoke
from podnet.versions import SUPPORTED_VERSIONS

from tests.integration.test_cni_helpers import CNI_DIR, make_net, runner, tortie_binary  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root


@pytest.fixture
def net(make_lab, tmp_path, tortie_binary):
    lab = make_lab(1)
    n = make_net(lab, tmp_path, [tortie_binary])
    n.pod = lab.add_pod_ns("bad")
    return n


def expect_error(r, code: int) -> dict:
    assert r.returncode != 0, r.stdout
    err = json.loads(r.stdout)
    assert err["code"] == code, err
    assert err["cniVersion"] in SUPPORTED_VERSIONS and err["msg"]
    return err


def fake_plugin(tmp_path, name: str, body: str) -> str:
    """An executable IPAM plugin in a CNI_PATH dir of its own (host-local next to it)."""
    d = tmp_path / "cnibin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return f"{d}:{CNI_DIR}"


def test_malformed_json_is_6(net):
    expect_error(net.run("ADD", net.attachment(net.pod, "p"), b'{"cniVersion": "1.0.0", '), 6)
    net.assert_nothing_left()


def test_missing_env_is_4(net):
    att = net.attachment(net.pod, "p")
    att.netns = ""
    err = expect_error(net.run("ADD", att), 4)
    assert "CNI_NETNS" in err["msg"]
    net.assert_nothing_left()


def test_unknown_version_is_1(net):
    expect_error(net.run("ADD", net.attachment(net.pod, "p"), net.conf(cniVersion="0.9.0")), 1)
    net.assert_nothing_left()


@pytest.mark.parametrize("ifname", ["eth0:1", "averyveryverylongname", "a/b"])
def test_bad_ifname_is_4(net, ifname):
    att = net.attachment(net.pod, "p", ifname=ifname)
    expect_error(net.run("ADD", att), 4)
    net.assert_nothing_left()


def test_missing_netns_is_3(net):
    att = net.attachment(net.pod, "p")
    att.netns = "/var/run/netns/does-not-exist"
    expect_error(net.run("ADD", att), 3)
    net.assert_nothing_left()


def test_the_nodes_own_namespace_is_refused(net):
    att = net.attachment(net.pod, "p")
    att.netns = f"/var/run/netns/{net.node_ns}"
    err = expect_error(net.run("ADD", att), 4)
    assert "own network namespace" in err["msg"]
    net.assert_nothing_left()


def test_unknown_ipam_plugin_is_7(net):
    expect_error(net.run("ADD", net.attachment(net.pod, "p"), net.conf(ipam={"type": "nope"})), 7)
    net.assert_nothing_left()


def test_failing_ipam_plugin_passes_its_error_on(net, tmp_path):
    net.cni_path = fake_plugin(tmp_path, "failipam",
                               'echo \'{"cniVersion":"1.0.0","code":120,"msg":"pool exhausted"}\'; exit 1\n')
    conf = net.conf(ipam={"type": "failipam"})
    err = expect_error(net.run("ADD", net.attachment(net.pod, "p"), conf), 120)
    assert "failipam" in err["msg"] and "pool exhausted" in err["msg"]
    net.assert_nothing_left()


def test_ipam_garbage_result_releases_the_address(net, tmp_path):
    # Allocates for real through host-local, then answers ADD with nonsense.
    net.cni_path = fake_plugin(tmp_path, "garbageipam", f"""
out=$({CNI_DIR}/host-local); rc=$?
if [ "$CNI_COMMAND" = ADD ] && [ $rc -eq 0 ]; then echo '{{"ips": "garbage"}}'; exit 0; fi
echo "$out"; exit $rc
""")
    conf = net.conf()
    conf["ipam"]["type"] = "garbageipam"
    err = expect_error(net.run("ADD", net.attachment(net.pod, "p"), conf), 101)
    assert "invalid result" in err["msg"]
    net.assert_nothing_left()


def test_plumbing_failure_after_ipam_releases_the_address(net):
    # The pod already has an eth0 (not ours): wiring fails after host-local allocated.
    net.lab.exec(net.pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    err = expect_error(net.run("ADD", net.attachment(net.pod, "p")), 100)
    assert "eth0 already exists" in err["msg"]
    net.assert_nothing_left()
    assert "eth0" in net.lab.exec(net.pod, "ip", "link", "show", "eth0").stdout  # not touched


def test_check_without_prev_result_is_7(net):
    att, res = net.add(net.pod, "p")
    expect_error(net.run("CHECK", att, net.conf()), 7)
    assert net.run("DEL", att).ok
    net.assert_nothing_left()


# Configs from a grammar close to valid, through the real binary inside the lab: each run
# gives a result (then DEL cleans it) or a CNI error with nothing left behind.
near_valid = st.fixed_dictionaries({
    "cniVersion": st.sampled_from(SUPPORTED_VERSIONS + ("0.2.0", "7.0.0")),
    "name": st.sampled_from(["k8s-pod-network", "k8s-pod-network", "-bad"]),
    "type": st.just("tortie"),
    "mtu": st.one_of(st.integers(0, 70000), st.sampled_from([1500, 1450, 9000]), st.just("1500")),
    "ipam": st.sampled_from(["host-local", "host-local", "nope", ""]),
    "ipMasq": st.sampled_from([False, True]),
    "dns": st.one_of(st.just({}), st.just({"nameservers": ["10.96.0.10"]}), st.just([])),
})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=near_valid)
def test_generated_configs_through_the_binary(net, spec):
    conf = net.conf(cniVersion=spec["cniVersion"], name=spec["name"], mtu=spec["mtu"], ipMasq=spec["ipMasq"],
                    dns=spec["dns"])
    conf["ipam"]["type"] = spec["ipam"]
    att = net.attachment(net.pod, "fz")
    r = net.run("ADD", att, conf)
    out = json.loads(r.stdout)
    assert out["cniVersion"] == (spec["cniVersion"] if spec["cniVersion"] in SUPPORTED_VERSIONS else "1.1.0")
    if r.ok:
        assert out["ips"] and out["interfaces"][1]["name"] == "eth0"
        assert net.run("DEL", att, conf).ok
    else:
        assert out["code"] in (1, 2, 6, 7) and out["msg"]
    net.assert_nothing_left()
