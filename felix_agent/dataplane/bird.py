"""The BIRD process of one node: write the config safely, start it, reload it on change,
restart it if it died, and read its protocol table.

Files live in run_dir: bird.conf (the running config), bird.ctl (control socket),
bird.pid.  A new config is first written to a temporary file and checked with BIRD's
own parser (`bird -p -c`); only a config that parses replaces bird.conf (rename, so
BIRD never reads half a file), and a bad one raises BirdError with BIRD's message
while the running BIRD keeps its good config.  The control socket is a filesystem path,
so birdc runs from anywhere; only bird itself is started inside the node's netns.

A BIRD that starts while the kernel still holds proto bird routes is a restart (the agent's
pod was replaced and took its BIRD along, or BIRD died): it starts with -R, graceful restart
recovery, so that those routes stay in place until the peers have sent theirs again (the
rendered config's `graceful restart` options; calc/bird_conf.py).  Without them, as on a
fresh node, it starts plainly and exports at once.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["started", "reloaded", "unchanged"]


class BirdError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProtocolStatus:
    """One row of `birdc show protocols`."""

    name: str
    proto: str  # "BGP", "Kernel", "Static", "Device", "Direct"
    state: str  # "up", "down", "start", ...
    info: str  # "Established", "Active  Socket: Connection refused", ...

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "proto": self.proto, "state": self.state, "info": self.info}


_DATE = re.compile(r"\d{4}-\d\d-\d\d$")


def parse_protocols(text: str) -> list[ProtocolStatus]:
    """Parse `birdc show protocols` output.  Columns are whitespace-separated: Name Proto
    Table State Since Info, where Since is one token, or two with a date ("iso long",
    which the rendered config selects); Info is the rest of the line."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] in ("BIRD", "Name") or line.startswith(" "):
            continue
        name, proto, _table, state = parts[:4]
        rest = parts[4:]
        rest = rest[2:] if _DATE.match(rest[0]) and len(rest) > 1 else rest[1:]
        rows.append(ProtocolStatus(name, proto, state, " ".join(rest)))
    return rows


class BirdDaemon:
    """`ensure(text)` keeps one bird running with `text` as its config."""

    def __init__(self, run_dir: str, netns: str | None = None, bird_bin: str = "bird",
                 birdc_bin: str = "birdc", start_timeout: float = 10.0):
        self.run_dir = os.path.abspath(run_dir)
        self.netns = netns
        self.bird_bin = bird_bin
        self.birdc_bin = birdc_bin
        self.start_timeout = start_timeout
        self.conf_path = os.path.join(self.run_dir, "bird.conf")
        self.sock_path = os.path.join(self.run_dir, "bird.ctl")
        self.pid_path = os.path.join(self.run_dir, "bird.pid")
        self.log_path = os.path.join(self.run_dir, "bird.log")

    # -- config ---------------------------------------------------------------------

    def _check(self, path: str) -> None:
        try:
            p = subprocess.run([self.bird_bin, "-p", "-c", path], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise BirdError(f"{self.bird_bin} is not installed (apt package bird2)") from None
        if p.returncode != 0:
            msg = (p.stderr.strip() or p.stdout.strip()).replace(path, "<new config>")
            raise BirdError(f"BIRD rejected the config: {msg}")

    def _write(self, config_text: str) -> None:
        """Check, then atomically replace bird.conf; the old file stays on any failure."""
        os.makedirs(self.run_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bird-", suffix=".conf", dir=self.run_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(config_text)
                f.flush()
                os.fsync(f.fileno())
            self._check(tmp)
            os.replace(tmp, self.conf_path)
        except BaseException:
            _unlink(tmp)
            raise

    def current_config(self) -> str | None:
        try:
            with open(self.conf_path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    # -- process --------------------------------------------------------------------

    def pid(self) -> int | None:
        """The running bird's pid, or None when it is not running."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return None
        if pid <= 0 or not _alive(pid):
            return None
        # A reused pid is not our bird: check the command line names our socket.
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.sock_path.encode() not in f.read():
                    return None
        except FileNotFoundError:
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def ensure(self, config_text: str, reload: bool = False) -> Outcome:
        """Make bird run `config_text`: "started" (it was not running, or had died),
        "reloaded" (running, text changed or `reload`, e.g. a file it includes changed:
        `birdc configure`), or "unchanged"."""
        if self.running():
            if self.current_config() == config_text and not reload:
                return "unchanged"
            self._write(config_text)
            out = self.birdc("configure")
            if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
                raise BirdError(f"birdc configure failed: {out.strip()}")
            return "reloaded"
        self._write(config_text)
        self._start()
        return "started"

    def _start(self) -> None:
        for stale in (self.sock_path, self.pid_path):
            _unlink(stale)
        argv = [self.bird_bin, "-c", self.conf_path, "-s", self.sock_path, "-P", self.pid_path]
        if self.kernel_has_bird_routes():
            argv.append("-R")
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.log_path, "ab") as log:
            # bird forks into the background itself; this waits for the parent only.
            p = subprocess.run(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                               timeout=self.start_timeout, start_new_session=True)
        if p.returncode != 0:
            raise BirdError(f"bird failed to start ({p.returncode}): {self._log_tail()}")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.running() and self._ctl_ok():
                return
            time.sleep(0.05)
        raise BirdError(f"bird did not come up within {self.start_timeout}s: {self._log_tail()}")

    def kernel_has_bird_routes(self) -> bool:
        """True when the main table holds IPv4 routes of protocol bird: forwarding state a
        previous BIRD left, which a restart must keep (see the module doc)."""
        argv = ["ip", *(["-n", self.netns] if self.netns else []), "-4", "route", "show", "proto", "bird"]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return False  # unknown: a plain start, as on a fresh node
        return p.returncode == 0 and bool(p.stdout.strip())

    def _ctl_ok(self) -> bool:
        try:
            return "Daemon is up" in self.birdc("show status")
        except BirdError:
            return False

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-500:].strip() or "(no output)"
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop bird (SIGTERM: it closes its sessions cleanly, so peers withdraw its
        routes at once and its own kernel routes go away).  No-op when not running."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
        for stale in (self.sock_path, self.pid_path):
            _unlink(stale)

    # -- control socket ------------------------------------------------------------

    def birdc(self, *command: str) -> str:
        try:
            p = subprocess.run([self.birdc_bin, "-s", self.sock_path, *command],
                               capture_output=True, text=True, timeout=15)
        except FileNotFoundError:
            raise BirdError(f"{self.birdc_bin} is not installed (apt package bird2)") from None
        except subprocess.TimeoutExpired:
            raise BirdError(f"birdc {' '.join(command)} timed out") from None
        if p.returncode != 0:
            raise BirdError(f"birdc {' '.join(command)} failed: {(p.stderr or p.stdout).strip()}")
        return p.stdout

    def protocols(self) -> list[dict[str, str]]:
        """[{name, proto, state, info}] from `birdc show protocols`."""
        return [r.as_dict() for r in parse_protocols(self.birdc("show", "protocols"))]

    def recovering(self) -> bool:
        """True while a BIRD started with -R waits for its peers' routes (its exports to
        the kernel and to the peers are held back meanwhile); False when it is not running
        or birdc cannot tell."""
        if not self.running():
            return False
        try:
            return "Graceful restart recovery in progress" in self.birdc("show", "status")
        except BirdError:
            return False

    def established_peers(self) -> list[str]:
        """Names of the BGP protocols whose session is Established."""
        return [r["name"] for r in self.protocols()
                if r["proto"] == "BGP" and r["info"].startswith("Established")]


def _alive(pid: int) -> bool:
    """True while `pid` runs.  bird daemonizes, so its parent is init, which may reap
    it late: a zombie counts as dead (it no longer routes or answers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
