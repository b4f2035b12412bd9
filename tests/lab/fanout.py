"""A real tortie-fanout process (the installed entry point) on free loopback ports, for
tests and the fan-out benchmark: start, kill -9, start again on the same ports, and read
its Prometheus metrics."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.lab.etcd import free_port

VENV_BIN = os.path.dirname(sys.executable)


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
