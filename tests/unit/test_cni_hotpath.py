"""The binary's start-up budget, kept by tests (no root needed).

The CNI binary is a new process for every pod, so what cni_plugin.main imports is paid
on every ADD and DEL.  These tests fail when a heavy module creeps back onto that path,
and check that podnet.jsoncodec (the _json-based codec that replaces `json` there)
reads and writes exactly what json does."""
import json
import math
import os
import subprocess
import sys

import pytest

from podnet import jsoncodec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each of these cost from 1.5 to 12 ms at every start of the bundled binary (measured
# with tests/bench/bench_cni.py and -X importtime); none is needed to forward a request.
HEAVY = ("json", "re", "enum", "logging", "dataclasses", "inspect", "socket", "ipaddress", "hashlib",
         "typing", "contextlib", "subprocess", "array", "collections", "pyroute2")


def _probe_argv(code: str) -> list[str]:
    """A fresh interpreter (no site, no PYTHON* variables: like the bundle) that runs `code`
    and then prints its sys.modules."""
    return [sys.executable, "-S", "-E", "-c",
            f"import sys; sys.path.insert(0, {ROOT!r}); {code}; print(' '.join(sorted(sys.modules)))"]


def _modules_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter (no site: like the bundle) after `code`."""
    p = subprocess.run(_probe_argv(code), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.split())


def test_the_agent_path_imports_nothing_heavy():
    loaded = _modules_after("import cni_plugin.main")
    assert not loaded & set(HEAVY), f"heavy modules on the binary's hot path: {sorted(loaded & set(HEAVY))}"


def test_a_whole_run_stays_light(tmp_path):
    """run() for an ADD through to its CNI error (the netns check refuses the test's own
    namespace): config parsing, the log file and the error output, no heavy import."""
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "tortie", "ipam": {"type": "tortie"},
            "agent_socket": str(tmp_path / "none.sock"), "log_file_path": str(tmp_path / "cni.log"),
            "log_level": "debug"}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    loaded = _modules_after(f"from cni_plugin.main import run; run({env!r}, {json.dumps(conf).encode()!r})")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "ADD c1/eth0 -> error 4" in (tmp_path / "cni.log").read_text()


SAMPLES = [
    {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.5/32", "interface": 1}], "dns": {}},
    {"a": [1, -2, 3.5, 1e300, -0.0, None, True, False], "é": "x\u00e9\n\"\\\u2028", "nested": {"": [[], {}]}},
    [], {}, "text", 0, 1.25, None, True,
]


@pytest.mark.parametrize("obj", SAMPLES)
def test_jsoncodec_writes_and_reads_what_json_does(obj):
    assert jsoncodec.dumps(obj) == json.dumps(obj)
    assert jsoncodec.dumps(obj, separators=(",", ":")) == json.dumps(obj, separators=(",", ":"))
    text = json.dumps(obj)
    assert jsoncodec.loads(text) == json.loads(text)
    assert jsoncodec.loads(text.encode()) == json.loads(text.encode())


def test_jsoncodec_non_finite_floats_round_trip():
    out = jsoncodec.loads(jsoncodec.dumps([float("inf"), float("-inf"), float("nan")]))
    assert out[0] == math.inf and out[1] == -math.inf and math.isnan(out[2])


@pytest.mark.parametrize("bad", [b"", b"   ", b"{", b'{"a": 1} x', b"[1,]", b"tru", b'"\x01"', b"\xff",
                                 b'{"a" 1}', b"\xef\xbb\xbf"])
def test_jsoncodec_rejects_what_json_rejects_with_the_same_error(bad):
    with pytest.raises(ValueError) as mine:
        jsoncodec.loads(bad)
    with pytest.raises(ValueError) as ref:
        json.loads(bad)
    assert type(mine.value) is type(ref.value) and str(mine.value) == str(ref.value)


def test_jsoncodec_accepts_a_utf8_bom_like_json():
    assert jsoncodec.loads(b'\xef\xbb\xbf{"a": 1}') == json.loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


def test_jsoncodec_errors_without_json_loaded_beforehand():
    """The C scanner reports syntax errors through json.decoder without importing it; in a
    fresh interpreter (the bundle) the codec must still raise a proper JSONDecodeError."""
    code = ("from podnet import jsoncodec\n"
            "try:\n    jsoncodec.loads(b'{\"cniVersion\": ')\n"
            "except ValueError as e:\n    print(type(e).__name__, e)\n")
    p = subprocess.run([sys.executable, "-S", "-E", "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + code],
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "JSONDecodeError Expecting value: line 1 column 16 (char 15)", p.stderr


def test_jsoncodec_refuses_what_json_cannot_encode():
    with pytest.raises(TypeError):
        jsoncodec.dumps({"a": object()})
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError):
        jsoncodec.dumps(loop)


def test_the_no_agent_plumbing_path_imports_no_pyroute2():
    """Without an agent the binary runs podnet.plumbing itself; it speaks rtnetlink on
    its own socket (podnet/rtnl.py) and leaves pyroute2 (110-140 ms to import, plus
    asyncio) to CHECK.  The teardown of an absent attachment below really asks the kernel
    (RTM_GETLINK needs no root); the full ADD/DEL is tests/integration/test_plumbing_rtnl.py."""
    loaded = _modules_after("from podnet import plumbing; plumbing.teardown(None, 'eth0', 'calinosuchif0')")
    assert not {m for m in loaded if m.split(".")[0] in ("pyroute2", "asyncio", "threading")}, sorted(loaded)


# The no-agent path (ipam.type host-local, no agent_socket): the binary runs host-local
# and the plumbing itself.  `run` is main.run() in a fresh interpreter started as the
# runtime starts the binary (CNI_* environment, config on stdin); the modules it loaded
# go to stderr, stdout is the CNI result as the binary prints it.
_NO_AGENT_RUN = ("import os; from cni_plugin.main import run; "
                 "rc, out = run(dict(os.environ), sys.stdin.buffer.read()); "
                 "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n'); "
                 "sys.stdout.write(out + '\\n'); sys.exit(rc)")

def _loaded(stderr: str) -> set[str]:
    lines = [line for line in stderr.splitlines() if line.startswith("MODULES ")]
    assert lines, stderr
    return set(lines[-1].split()[1:])


@pytest.mark.root
def test_a_whole_no_agent_add_and_del_stay_light(make_lab, tmp_path):
    """A real ADD then DEL without an agent (dual-stack host-local in a tmp dataDir, the veth
    wired in a lab pod namespace): the IPAM plugin is executed, the attachment record
    written, the veth named and wired, the result printed, all without a HEAVY import."""
    from tests.integration.test_cni_helpers import make_net

    lab = make_lab(1)
    net = make_net(lab, tmp_path, [sys.executable, "-S", "-E", "-c",
                                   f"import sys; sys.path.insert(0, {ROOT!r}); {_NO_AGENT_RUN}"],
                   subnet6="fd00:7::/64")
    pod = lab.add_pod_ns("light")
    att = net.attachment(pod, "light")
    add = net.run("ADD", att)
    assert add.ok, (add.stdout, add.stderr)
    assert not _loaded(add.stderr) & set(HEAVY), sorted(_loaded(add.stderr) & set(HEAVY))
    assert [ip["address"].split("/")[1] for ip in add.output["ips"]] == ["32", "128"]
    assert len(net.cali_links()) == 1 and len(net.records()) == 1 and len(net.allocated()) == 2
    delete = net.run("DEL", att)
    assert delete.ok, (delete.stdout, delete.stderr)
    assert not _loaded(delete.stderr) & set(HEAVY), sorted(_loaded(delete.stderr) & set(HEAVY))
    net.assert_nothing_left()
