"""A real tortie-fanout process (the installed entry point) on free loopback ports, for
tests and the fan-out benchmark: start, kill -9, start again on the same ports, and read
its Prometheus metrics. ClientProcess: an agent's datastore side as a process of its own
(tests/lab/fanout_client.py), its model rebuilt from what it prints."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from felix_agent.datastore.convert import from_k8s
from tests.lab.etcd import free_port

VENV_BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Fanout:
    def __init__(self, kubeconfig: str, log_path: str, *extra: str):
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.extra = extra
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 30) -> "Fanout":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [os.path.join(VENV_BIN, "tortie-fanout"), "--kubeconfig", self.kubeconfig,
             "--listen", f"127.0.0.1:{self.port}", "--metrics-port", str(self.metrics_port), *self.extra],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tortie-fanout exited {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                socket.create_connection(self.address, timeout=1).close()
                self.metrics()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tortie-fanout not listening after {timeout:.0f}s: {self.log()[-2000:]}")
                time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def metrics(self) -> dict[str, float]:
        """The tortie_fanout_* samples, by name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("tortie_fanout_"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self) -> "Fanout":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGTERM)


class ClientProcess:
    """tests/lab/fanout_client.py connected to `address`; `enter` is a command prefix
    that puts it in a network namespace (nsenter ...)."""

    def __init__(self, address: tuple[str, int] | str, node: str, enter: list[str] = ()):
        """`address`: a fan-out's (host, port), or a kubeconfig path (the agent then
        watches the API itself)."""
        target = ["--direct", address] if isinstance(address, str) else [f"{address[0]}:{address[1]}"]
        self.proc = subprocess.Popen([*enter, sys.executable, "-m", "tests.lab.fanout_client",
                                      *target, node], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.state: dict = {}
        self.statuses: list[tuple[bool, str]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            ev = json.loads(line)
            with self._lock:
                if "status" in ev:
                    self.statuses.append(tuple(ev["status"]))
                else:
                    kind, key, value = ev["update"]
                    if value is None:
                        self.state.pop((kind, key), None)
                    else:
                        self.state[(kind, key)] = from_k8s(value, kind)

    @property
    def in_sync(self) -> bool:
        with self._lock:
            return bool(self.statuses) and self.statuses[-1][0]

    def model(self) -> dict:
        with self._lock:
            return dict(self.state)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
