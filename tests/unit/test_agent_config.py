"""Agent configuration: precedence, and bad input named by key."""
import json

import pytest

from felix_agent import config


def test_precedence_flags_over_env_over_file(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("node_name: from-file\nmtu: 1400\nresync_interval: 3\n")
    env = {"TORTIE_MTU": "1300", "TORTIE_CONFIG": str(f)}
    c = config.load(["--resync-interval", "7"], environ=env)
    assert (c.node_name, c.mtu, c.resync_interval) == ("from-file", 1300, 7.0)


def test_json_file_and_booleans(tmp_path):
    f = tmp_path / "agent.json"
    f.write_text(json.dumps({"bird": "false", "datastore": "kubernetes"}))
    c = config.load(["--config", str(f)], environ={})
    assert c.bird is False and c.datastore == "kubernetes"


@pytest.mark.parametrize("argv,env,filetext,named", [
    ([], {"TORTIE_NOPE": "1"}, None, "TORTIE_NOPE"),
    (["--mtu", "abc"], {}, None, "mtu"),
    (["--datastore", "redis"], {}, None, "datastore"),
    ([], {"TORTIE_BIRD": "maybe"}, None, "bird"),
    ([], {}, "colour: blue\n", "colour"),
    ([], {}, "- a list\n", "mapping"),
    (["--node-ip", "300.1.1.1/24"], {}, None, "node_ip"),
    (["--node-ip6", "192.168.1.1/24"], {}, None, "node_ip6"),
    (["--default-pool", "10.65.0.0/16,10.66.0.0/16"], {}, None, "default_pool: two IPv4 CIDRs"),
    (["--default-pool", "fd00::/64,banana"], {}, None, "default_pool: 'banana' is not a CIDR"),
    (["--default-pool", "fd00::/64", "--default-pool-mode", "ipip"], {}, None, "ipip carries IPv4 only"),
    (["--etcd-endpoints", "nohostport"], {}, None, "etcd_endpoints"),
    (["--resync-interval", "0"], {}, None, "resync_interval"),
    (["--etcd-endpoints", "https://10.0.0.1:2379"], {}, None, "etcd_ca_file"),
    (["--etcd-ca-file", "/ca.pem"], {}, None, "https://"),
    (["--etcd-endpoints", "https://e:2379", "--etcd-ca-file", "/ca", "--etcd-cert-file", "/c"], {}, None,
     "etcd_key_file"),
    (["--fanout-endpoints", "fanout:5473"], {}, None, "fanout_endpoints: tortie-fanout serves the kubernetes"),
    (["--datastore", "kubernetes", "--fanout-endpoints", "fanout"], {}, None,
     "fanout_endpoints: 'fanout' is not host:port"),
    (["--datastore", "kubernetes", "--fanout-endpoints", "a:5473,b:70000"], {}, None,
     "fanout_endpoints: 'b:70000' is not host:port (port 1-65535)"),
    (["--datastore", "kubernetes", "--fanout-endpoints", "a:5473,"], {}, None, "fanout_endpoints: ''"),
    ([], {"TORTIE_DATASTORE": "kubernetes", "TORTIE_FANOUT_ENDPOINTS": ":5473"}, None, "fanout_endpoints"),
])
def test_bad_config_names_the_key(tmp_path, argv, env, filetext, named):
    if filetext is not None:
        f = tmp_path / "c.yaml"
        f.write_text(filetext)
        argv = argv + ["--config", str(f)]
    with pytest.raises(config.ConfigError) as e:
        config.load(argv, environ=env)
    assert named in str(e.value)


def test_dual_stack_default_pool():
    c = config.load(["--default-pool", "fd00:10:65::/112, 10.65.0.0/16", "--node-ip6", "fd00:100::11/64"],
                    environ={})
    assert c.default_pools == [("default-pool", "10.65.0.0/16"), ("default-pool-v6", "fd00:10:65::/112")]
    assert config.load(["--default-pool", "10.65.0.0/16"], environ={}).default_pools == [
        ("default-pool", "10.65.0.0/16")]


def test_etcd_endpoint_forms():
    plain = config.load(["--etcd-endpoints", "http://10.0.0.1:2379"], environ={})
    assert (plain.etcd_host, plain.etcd_port, plain.etcd_tls) == ("10.0.0.1", 2379, False)
    tls = config.load([], environ={"TORTIE_ETCD_ENDPOINTS": "https://etcd.example:2379,https://b:2379",
                                   "TORTIE_ETCD_CA_FILE": "/ca.pem"})
    assert (tls.etcd_host, tls.etcd_port, tls.etcd_tls) == ("etcd.example", 2379, True)


def test_fanout_endpoints_and_the_service_links_of_its_service():
    """The kubelet gives every pod of the agent's namespace TORTIE_FANOUT_* variables for
    the tortie-fanout Service there; they are not settings (an unknown TORTIE_* still is
    an error), and the manifest builds fanout_endpoints from two of them."""
    env = {"TORTIE_DATASTORE": "kubernetes", "TORTIE_FANOUT_ENDPOINTS": "10.96.0.40:5473, [fd00::40]:5473",
           "TORTIE_FANOUT_SERVICE_HOST": "10.96.0.40", "TORTIE_FANOUT_SERVICE_PORT": "5473",
           "TORTIE_FANOUT_SERVICE_PORT_FANOUT": "5473", "TORTIE_FANOUT_PORT": "tcp://10.96.0.40:5473",
           "TORTIE_FANOUT_PORT_5473_TCP": "tcp://10.96.0.40:5473", "TORTIE_FANOUT_PORT_5473_TCP_PROTO": "tcp",
           "TORTIE_FANOUT_PORT_5473_TCP_PORT": "5473", "TORTIE_FANOUT_PORT_5473_TCP_ADDR": "10.96.0.40"}
    c = config.load([], environ=env)
    assert c.fanout_addresses == [("10.96.0.40", 5473), ("fd00::40", 5473)]
    assert config.load([], environ={}).fanout_endpoints == ""
    with pytest.raises(config.ConfigError, match="TORTIE_FANOUT_SERVICE_HOSTS"):
        config.load([], environ={"TORTIE_FANOUT_SERVICE_HOSTS": "x"})


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        config.parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for key in config.FIELDS:
        assert "--" + key.replace("_", "-") in out
