"""Validation of the CNI environment and network config (no root)."""
import json

import pytest

from podnet import netconf as config
from podnet.agent_protocol import DEFAULT_SOCKET
from podnet.errors import CNIError

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/p1",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni:/opt/cni/bin",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;FOO=bar"}
BASE_CONF = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tortie",
             "ipam": {"type": "host-local", "subnet": "10.0.0.0/24"}}


def conf_bytes(**over) -> bytes:
    c = dict(BASE_CONF)
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return json.dumps(c).encode()


def code_of(fn, *a) -> int:
    with pytest.raises(CNIError) as ei:
        fn(*a)
    return ei.value.code


def test_env_parsed():
    env = config.parse_env(BASE_ENV)
    assert env.command == "ADD" and env.container_id == "abc123" and env.ifname == "eth0"
    assert env.path == ["/usr/lib/cni", "/opt/cni/bin"]
    assert env.args == {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0"}
    assert (env.k8s_namespace, env.k8s_pod) == ("default", "web-0")


@pytest.mark.parametrize("drop", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])
def test_missing_env_is_code_4(drop):
    env = {k: v for k, v in BASE_ENV.items() if k != drop}
    assert code_of(config.parse_env, env) == 4


@pytest.mark.parametrize("command,needed", [("DEL", ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]),
                                            ("GC", ["CNI_PATH"]), ("STATUS", ["CNI_PATH"]), ("VERSION", [])])
def test_each_command_needs_only_its_variables(command, needed):
    env = {"CNI_COMMAND": command, **{k: BASE_ENV[k] for k in needed}}
    assert config.parse_env(env).command == command  # CNI_NETNS is optional for DEL
    for k in needed:
        assert code_of(config.parse_env, {kk: v for kk, v in env.items() if kk != k}) == 4


@pytest.mark.parametrize("ifname", ["", "a" * 16, ".", "..", "eth/0", "eth:0", "eth 0", "eth\t0", "e\x00"])
def test_bad_ifname_is_code_4(ifname):
    assert code_of(config.parse_env, dict(BASE_ENV, CNI_IFNAME=ifname)) == 4


def test_longest_ifname_accepted():
    assert config.parse_env(dict(BASE_ENV, CNI_IFNAME="a" * 15)).ifname == "a" * 15


@pytest.mark.parametrize("cid", ["-abc", "a/b", "a b", "a@b", "é"])
def test_bad_container_id_is_code_4(cid):
    assert code_of(config.parse_env, dict(BASE_ENV, CNI_CONTAINERID=cid)) == 4


def test_unknown_command_and_relative_netns():
    assert code_of(config.parse_env, dict(BASE_ENV, CNI_COMMAND="ATTACH")) == 4
    assert code_of(config.parse_env, dict(BASE_ENV, CNI_NETNS="netns/p1")) == 4


@pytest.mark.parametrize("raw,ok", [
    ("", True), ("K8S_POD_NAME=a", True), ("IgnoreUnknown=1;X=1", True), ("IgnoreUnknown=true;X=1", True),
    ("X=1", False), ("IgnoreUnknown=0;X=1", False), ("novalue", False), ("=x", False),
    ("IgnoreUnknown=maybe", False), ("K8S_POD_NAME=a b", False),
])
def test_cni_args(raw, ok):
    if ok:
        config.parse_cni_args(raw)
    else:
        assert code_of(config.parse_cni_args, raw) == 4


def test_config_defaults():
    c = config.parse_config(conf_bytes(), "ADD")
    assert (c.cni_version, c.name, c.ipam_type, c.mtu) == ("1.0.0", "k8s-pod-network", "host-local", 1500)
    assert not c.uses_agent and c.log_file_path == "/var/log/tortie/cni.log"


def test_tortie_ipam_uses_the_default_agent_socket():
    c = config.parse_config(conf_bytes(ipam={"type": "tortie"}), "ADD")
    assert c.uses_agent and c.agent_socket == DEFAULT_SOCKET and c.ipam_is_tortie
    c = config.parse_config(conf_bytes(agent_socket="/tmp/a.sock"), "ADD")
    assert c.uses_agent and c.agent_socket_explicit and not c.ipam_is_tortie


@pytest.mark.parametrize("data,code", [
    (b"{bad", 6), (b"[]", 6), (b"\xff\xfe", 6), (b"", 6),
    (conf_bytes(cniVersion=None), 7), (conf_bytes(cniVersion=1), 7),
    (conf_bytes(cniVersion="0.2.0"), 1), (conf_bytes(cniVersion="2.0.0"), 1), (conf_bytes(cniVersion="x"), 1),
    (conf_bytes(name=None), 7), (conf_bytes(name="-bad"), 7), (conf_bytes(name="a b"), 7),
    (conf_bytes(type=None), 7), (conf_bytes(ipam=None), 7), (conf_bytes(ipam={}), 7),
    (conf_bytes(ipam={"type": "../../bin/sh"}), 7), (conf_bytes(ipam="host-local"), 7),
    (conf_bytes(mtu=0), 7), (conf_bytes(mtu=70000), 7), (conf_bytes(mtu="1500"), 7), (conf_bytes(mtu=True), 7),
    (conf_bytes(log_level="loud"), 7), (conf_bytes(agent_socket=""), 7), (conf_bytes(agent_timeout=-1), 7),
    (conf_bytes(dns=[]), 7), (conf_bytes(runtimeConfig=[]), 7),
    (conf_bytes(prevResult={"ips": [{"address": "nope"}]}), 7),
    (conf_bytes(prevResult={"ips": [{"address": "10.0.0.1/32", "interface": 3}]}), 7),
    (conf_bytes(ipMasq=True), 2),
])
def test_bad_config_codes(data, code):
    assert code_of(config.parse_config, data, "ADD") == code


def test_unsupported_field_message_names_key_and_value():
    with pytest.raises(CNIError) as ei:
        config.parse_config(conf_bytes(ipMasq=True), "ADD")
    assert "ipMasq=true" in ei.value.msg


def test_unknown_fields_are_passed_through():
    c = config.parse_config(conf_bytes(somethingElse={"x": 1}), "ADD")
    assert c.raw["somethingElse"] == {"x": 1}


def test_gc_valid_attachments_both_spellings():
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        c = config.parse_config(conf_bytes(cniVersion="1.1.0", **{key: [{"containerID": "c1", "ifname": "eth0"}]}), "GC")
        assert c.valid_attachments == [("c1", "eth0")]
    assert code_of(config.parse_config, conf_bytes(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"x": 1}]}),
                   "GC") == 7


def test_peek_version():
    assert config.peek_version(conf_bytes(cniVersion="0.3.1")) == "0.3.1"
    assert config.peek_version(b"garbage") == "1.1.0"
    assert config.peek_version(conf_bytes(cniVersion="9.9.9")) == "1.1.0"
