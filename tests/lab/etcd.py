"""A real etcd server on a free loopback port with its own data dir, for tests and the demo."""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port BELOW the kernel's ephemeral range: a server stopped and
    started again on its port (etcd restart tests) must not find it taken by some
    outgoing connection's local port in between."""
    lo, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randint(max(1024, lo - 12000), lo - 1)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


class Etcd:
    """`with Etcd() as e:` starts etcd (client port e.port) and removes its data afterwards.
    stop()/start() keep the data dir, so a test can take etcd away and bring it back."""

    def __init__(self, data_dir: str | None = None, port: int | None = None, certs=None):
        self.certs = certs  # tests.lab.certs.LabCerts: TLS with client-cert auth
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="tortie-etcd-")
        self.port = port or free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.data_dir, "etcd.log")

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        return "https://" if self.certs else ""

    @property
    def client_args(self) -> list[str]:
        """The TLS flags for tortiectl and tortie-agent (none for plaintext)."""
        if not self.certs:
            return []
        cert, key = self.certs.client
        return ["--etcd-ca-file", self.certs.ca, "--etcd-cert-file", cert, "--etcd-key-file", key]

    def start(self, timeout: float = 20) -> "Etcd":
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed (apt package etcd-server; run `make deps`)")
        url = f"{'https' if self.certs else 'http'}://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls: list[str] = []
        ctx = None
        if self.certs:
            cert, key = self.certs.server
            tls = ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", self.certs.ca,
                   "--client-cert-auth"]
            ctx = ssl.create_default_context(cafile=self.certs.ca)
            ctx.load_cert_chain(*self.certs.client)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "lab", "--data-dir", os.path.join(self.data_dir, "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"lab={peer}", "--log-level", "warn", *tls],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}): {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1, context=ctx) as r:
                    if b'"true"' in r.read():
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy in {timeout}s; see {self.log_path}")

    def _log_tail(self, n: int = 1500) -> str:
        # The data dir (and this log) is removed at close: put the reason in the error.
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace").strip()
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "Etcd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
