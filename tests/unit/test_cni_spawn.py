"""cni_plugin.ipam_exec.spawn: how the binary runs an IPAM plugin without the subprocess
module.  It must do what subprocess.run([path], input=..., capture_output=True, env=...,
timeout=...) did, so most tests run the same small shell plugin both ways and compare:
exit status, stdout, stderr, environment, open descriptors and signal dispositions in
the child.  No root needed."""
import os
import stat
import subprocess
import sys
import time

import pytest

from cni_plugin import ipam_exec
from podnet.errors import IPAM_FAILURE, CNIError
from cni_plugin.ipam_exec import Invocation, SpawnTimeout, spawn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def script(tmp_path, body: str, name: str = "plugin") -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def both(path: str, data: bytes, env: dict | None = None) -> tuple[tuple, tuple]:
    env = dict(os.environ) if env is None else env
    ref = subprocess.run([path], input=data, capture_output=True, env=env, timeout=30)
    return spawn(path, env, data, 30), (ref.returncode, ref.stdout, ref.stderr)


def test_stdin_env_stdout_stderr_and_status_as_subprocess(tmp_path):
    path = script(tmp_path, "cat; env | LC_ALL=C sort >&2; exit 3\n")
    env = {"CNI_COMMAND": "ADD", "CNI_PATH": "/x:/y", "ODD": "a b\tc=d", "PATH": os.environ["PATH"]}
    mine, ref = both(path, b'{"cniVersion": "1.0.0"}', env)
    assert mine == ref
    assert mine[0] == 3 and mine[1] == b'{"cniVersion": "1.0.0"}' and b"ODD=a b\tc=d\n" in mine[2]


def test_large_stdin_and_both_outputs_at_once_do_not_deadlock(tmp_path):
    """256 KiB each way, far beyond a pipe's 64 KiB: the child writes stderr before it has
    read all of stdin, so feeding and draining must happen together."""
    path = script(tmp_path, "head -c 131072 >/dev/null; head -c 262144 /dev/zero | tr '\\0' e >&2; "
                            "cat; head -c 262144 /dev/zero | tr '\\0' o\n")
    data = bytes(range(256)) * 1024
    mine, ref = both(path, data)
    assert mine == ref
    assert mine[1] == data[131072:] + b"o" * 262144 and mine[2] == b"e" * 262144


def test_a_plugin_that_reads_no_stdin(tmp_path):
    """A large input it never reads: the write fails with EPIPE, which is not an error."""
    path = script(tmp_path, "echo done; exit 0\n")
    mine, ref = both(path, b"x" * 300_000)
    assert mine == ref == (0, b"done\n", b"")


def test_empty_input_closes_stdin_at_once(tmp_path):
    mine, ref = both(script(tmp_path, "wc -c\n"), b"")
    assert mine == ref and mine[1].strip() == b"0"


def test_killed_by_a_signal_is_minus_the_signal(tmp_path):
    mine, ref = both(script(tmp_path, "kill -TERM $$\n"), b"")
    assert mine == ref and mine[0] == -15


def _sig_masks(out: bytes) -> dict[str, int]:
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in out.decode().splitlines())}


# glibc's posix_spawn leaves its two internal signals (32, 33: thread cancellation and
# setxid) ignored in the child, and refuses to reset them; no glibc program can use them
# (sigaction refuses them too) and Go installs its own handler for 33 whatever it finds.
GLIBC_INTERNAL = (1 << 31) | (1 << 32)


def test_the_child_gets_default_sigpipe_like_subprocess(tmp_path):
    """Python ignores SIGPIPE; an ignored signal would stay ignored across exec."""
    mine, ref = both(script(tmp_path, "grep -E '^Sig(Ign|Blk)' /proc/self/status\n"), b"")
    mine_masks, ref_masks = _sig_masks(mine[1]), _sig_masks(ref[1])
    assert mine_masks["SigBlk"] == ref_masks["SigBlk"]
    assert mine_masks["SigIgn"] & ~GLIBC_INTERNAL == ref_masks["SigIgn"] & ~GLIBC_INTERNAL
    assert not mine_masks["SigIgn"] & (1 << 12)  # SIGPIPE (13) at its default: die on EPIPE


def test_only_stdio_reaches_the_child_close_fds(tmp_path):
    """An inheritable descriptor of ours (as one the runtime leaked to the binary) is closed
    in the child, as close_fds=True does; and spawn leaves no descriptor behind."""
    fd = os.open(os.devnull, os.O_RDONLY)
    free = next(n for n in range(77, 1024) if str(n) not in os.listdir("/proc/self/fd"))
    leak = os.dup2(fd, free, inheritable=True)  # well above what ls's listing would get
    os.close(fd)
    try:
        path = script(tmp_path, "exec ls /proc/self/fd\n")  # ls's own: 0-2 and its listing's
        before = sorted(os.listdir("/proc/self/fd"))
        mine, ref = both(path, b"")
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(leak)
    assert mine == ref and mine[1].split() == [b"0", b"1", b"2", b"3"]


def test_a_parent_with_closed_stdio_still_wires_the_child_right(tmp_path):
    """When the binary itself runs without stdin/stdout, the pipes it makes land on 0 and 1;
    the child must still get the input on 0, its stdout on 1 and its stderr on 2."""
    path = script(tmp_path, "cat; echo err >&2\n")
    code = (f"import os, sys; sys.path.insert(0, {ROOT!r}); os.close(0); os.close(1)\n"
            "from cni_plugin.ipam_exec import spawn\n"
            f"r = spawn({path!r}, dict(os.environ), b'in', 10)\n"
            "os.write(2, repr(r).encode())\n")
    p = subprocess.run([sys.executable, "-S", "-E", "-c", code], capture_output=True, timeout=60)
    assert p.stderr == repr((0, b"in", b"err\n")).encode()


@pytest.mark.parametrize("kind", ["missing", "not executable", "no interpreter line"])
def test_exec_failures_raise_oserror_as_subprocess(tmp_path, kind):
    path = str(tmp_path / "plugin")
    if kind != "missing":
        with open(path, "wb") as f:
            f.write(b"\x7fELF garbage" if kind == "no interpreter line" else b"#!/bin/sh\n")
        os.chmod(path, 0o755 if kind == "no interpreter line" else 0o644)
    with pytest.raises(OSError) as ref:
        subprocess.run([path], input=b"", capture_output=True, timeout=30)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as mine:
        spawn(path, dict(os.environ), b"x", 30)
    assert (mine.value.errno, mine.value.strerror) == (ref.value.errno, ref.value.strerror)
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("body", ["sleep 30\n", "exec >&- 2>&- <&-; sleep 30\n"],
                         ids=["holding its pipes", "after closing its pipes"])
def test_timeout_kills_and_reaps_the_child(tmp_path, body):
    path = script(tmp_path, f"echo $$ > {tmp_path}/pid; {body}")
    before = sorted(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    with pytest.raises(SpawnTimeout):
        spawn(path, dict(os.environ), b"{}", 0.5)
    assert time.monotonic() - started < 10
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed AND reaped: not even a zombie is left
        os.kill(pid, 0)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_ipam_exec_maps_a_timeout_and_an_exec_failure_to_cni_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(ipam_exec, "IPAM_TIMEOUT", 0.3)
    slow = script(tmp_path, "sleep 30\n", "slow")
    with pytest.raises(CNIError) as e:
        ipam_exec._run(slow, Invocation("ADD"), [str(tmp_path)], b"{}")
    assert e.value.code == IPAM_FAILURE and e.value.msg == "IPAM plugin slow ADD did not finish within 0s"
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF")
    bad.chmod(0o755)
    with pytest.raises(CNIError) as e:
        ipam_exec._run(str(bad), Invocation("DEL"), [str(tmp_path)], b"{}")
    assert e.value.code == IPAM_FAILURE and e.value.msg == f"cannot execute IPAM plugin {bad}: Exec format error"


def test_ipam_exec_environment_of_the_plugin(tmp_path, monkeypatch):
    """CNI_* from the invocation; empty ones removed (not inherited from the binary's own)."""
    monkeypatch.setenv("CNI_NETNS", "/proc/1/ns/net")
    monkeypatch.setenv("CNI_ARGS", "stale")
    path = script(tmp_path, "env | grep ^CNI_ | LC_ALL=C sort\n")
    rc, out, _err = ipam_exec._run(path, Invocation("DEL", "c1", "", "eth0"), ["/a", "/b"], b"{}")
    assert rc == 0 and out.decode().splitlines() == [
        "CNI_COMMAND=DEL", "CNI_CONTAINERID=c1", "CNI_IFNAME=eth0", "CNI_PATH=/a:/b"]
