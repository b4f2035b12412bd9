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
    (["--etcd-endpoints", "nohostport"], {}, None, "etcd_endpoints"),
    (["--resync-interval", "0"], {}, None, "resync_interval"),
])
def test_bad_config_names_the_key(tmp_path, argv, env, filetext, named):
    if filetext is not None:
        f = tmp_path / "c.yaml"
        f.write_text(filetext)
        argv = argv + ["--config", str(f)]
    with pytest.raises(config.ConfigError) as e:
        config.load(argv, environ=env)
    assert named in str(e.value)


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        config.parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for key in config.FIELDS:
        assert "--" + key.replace("_", "-") in out
