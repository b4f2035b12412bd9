"""The README's fan-out commands, exactly as written, through the real parsers: the
`tortie-fanout` and `tortie-agent` lines of its code blocks, and the `kubectl set env` line,
which must be the one manifests/tortie-fanout.yaml's header gives."""
import os
import re
import shlex

from felix_agent import config
from felix_agent.datastore.fanout import main as fanout_main
from felix_agent.datastore.fanout.protocol import DEFAULT_PORT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def code_lines(path: str, prefix: str) -> list[str]:
    """Indented (README) or commented (manifest) command lines, continuations joined."""
    text = open(path).read().replace("\\\n#", " ").replace("\\\n", " ")
    lines = [re.sub(r"^(\s{4}|#\s+)", "", l).strip() for l in text.splitlines() if re.match(r"^(\s{4}|#\s+)", l)]
    return [re.sub(r"\s+", " ", l) for l in lines if l.startswith(prefix)]


def test_readme_fanout_commands_parse_as_written():
    readme = os.path.join(ROOT, "README.md")
    (server,) = code_lines(readme, "tortie-fanout ")
    args = fanout_main.parser().parse_args(shlex.split(server)[1:])
    assert args.listen == f"0.0.0.0:{DEFAULT_PORT}" and args.kubeconfig
    agents = [l for l in code_lines(readme, "tortie-agent ") if "--fanout-endpoints" in l]
    assert agents
    for line in agents:
        cfg = config.load(shlex.split(line)[1:], environ={})
        assert cfg.datastore == "kubernetes" and all(port == DEFAULT_PORT for _, port in cfg.fanout_addresses)


def test_readme_set_env_line_is_the_manifests():
    readme = code_lines(os.path.join(ROOT, "README.md"), "kubectl -n tortie-system set env")
    manifest = code_lines(os.path.join(ROOT, "manifests", "tortie-fanout.yaml"), "kubectl -n tortie-system set env")
    assert readme and readme == manifest
    (name, value), = [a.split("=", 1) for a in shlex.split(readme[0]) if a.startswith("TORTIE_")]
    assert name == "TORTIE_FANOUT_ENDPOINTS" and value == "$(TORTIE_FANOUT_SERVICE_HOST):$(TORTIE_FANOUT_SERVICE_PORT)"
