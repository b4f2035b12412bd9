"""The plugin as the runtime sees it (cni_plugin.main.run and `python -m cni_plugin`):
every outcome is a result or a CNI error JSON with the spec's code (no root needed)."""
import json
import os
import subprocess
import sys

import pytest

from cni_plugin.main import run
from podnet.versions import SUPPORTED_VERSIONS

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/nonexistent/netns/p1",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}


def conf(tmp_path, **over):
    c = {"cniVersion": "1.1.0", "name": "net", "type": "tortie", "log_file_path": str(tmp_path / "cni.log"),
         "state_dir": str(tmp_path / "state"), "ipam": {"type": "host-local", "subnet": "10.0.0.0/24"}}
    c.update(over)
    return json.dumps(c).encode()


def error_of(status, out):
    assert status == 1
    err = json.loads(out)
    assert set(err) <= {"cniVersion", "code", "msg", "details"} and err["msg"]
    assert err["cniVersion"] in SUPPORTED_VERSIONS
    return err


def test_version_lists_all_versions():
    status, out = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert status == 0
    assert json.loads(out) == {"cniVersion": "0.4.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    status, out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert json.loads(out)["cniVersion"] == "1.1.0"


def test_malformed_json_is_6(tmp_path):
    assert error_of(*run(ENV, b'{"cniVersion": '))["code"] == 6


def test_unknown_version_is_1_and_error_speaks_latest(tmp_path):
    err = error_of(*run(ENV, conf(tmp_path, cniVersion="0.9.9")))
    assert err["code"] == 1 and err["cniVersion"] == "1.1.0"


def test_error_is_in_the_configs_version(tmp_path):
    err = error_of(*run(ENV, conf(tmp_path, cniVersion="0.3.1")))
    assert err["code"] == 3 and err["cniVersion"] == "0.3.1"
    assert "does not exist" in err["msg"]


def test_missing_env_is_4(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "CNI_IFNAME"}
    assert error_of(*run(env, conf(tmp_path)))["code"] == 4


@pytest.mark.parametrize("command,version", [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0")])
def test_commands_newer_than_the_config_are_1(tmp_path, command, version):
    err = error_of(*run(dict(ENV, CNI_COMMAND=command), conf(tmp_path, cniVersion=version)))
    assert err["code"] == 1 and command in err["msg"]


def test_status_without_agent_is_50(tmp_path):
    c = conf(tmp_path, ipam={"type": "tortie"}, agent_socket=str(tmp_path / "none.sock"))
    err = error_of(*run({"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}, c))
    assert err["code"] == 50 and "not reachable" in err["msg"]


def test_status_with_missing_ipam_plugin_is_50(tmp_path):
    c = conf(tmp_path, ipam={"type": "no-such-ipam"})
    assert error_of(*run({"CNI_COMMAND": "STATUS", "CNI_PATH": str(tmp_path)}, c))["code"] == 50


def test_status_ok_with_host_local(tmp_path):
    if not os.access("/usr/lib/cni/host-local", os.X_OK):
        pytest.skip("containernetworking-plugins not installed")
    assert run({"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}, conf(tmp_path)) == (0, "")


def test_gc_without_agent_is_11(tmp_path):
    c = conf(tmp_path, ipam={"type": "tortie"}, agent_socket=str(tmp_path / "none.sock"))
    assert error_of(*run({"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}, c))["code"] == 11


def test_gc_with_nothing_recorded_succeeds(tmp_path):
    c = conf(tmp_path, **{"cni.dev/valid-attachments": []})
    assert run({"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}, c) == (0, "")


def test_logs_go_to_the_file_not_stdout(tmp_path):
    status, out = run(ENV, conf(tmp_path))
    assert json.loads(out)["code"] == 3
    assert "ADD c1/eth0 -> error 3" in (tmp_path / "cni.log").read_text()


def test_module_entry_and_no_heavy_imports_on_the_agent_path(tmp_path):
    """`python -m cni_plugin` prints the same, and the ADD path (agent IPAM) imports no
    pyroute2/kubernetes/grpc/aetcd/yaml."""
    c = conf(tmp_path, ipam={"type": "tortie"}, agent_socket=str(tmp_path / "a.sock"))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "cni_plugin"], input=c,
                       capture_output=True, env=dict(os.environ, **ENV))
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 3
    imported = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "cni_plugin" in imported
    assert not imported & {"pyroute2", "kubernetes", "grpc", "aetcd", "yaml", "felix_agent"}
