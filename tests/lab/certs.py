"""Throwaway certificates for etcd over TLS in the lab, made with the openssl CLI in a
directory of the test's own: a CA, etcd's server certificate (for 127.0.0.1), a client
certificate, an expired client certificate, and a second CA that signed none of them."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


def _ssl(*args: str, cwd: str) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {p.stderr.strip()}")


@dataclass(frozen=True)
class LabCerts:
    dir: str

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def ca(self) -> str:
        return self.path("ca.crt")

    @property
    def other_ca(self) -> str:
        return self.path("other-ca.crt")

    @property
    def server(self) -> tuple[str, str]:
        return self.path("server.crt"), self.path("server.key")

    @property
    def client(self) -> tuple[str, str]:
        return self.path("client.crt"), self.path("client.key")

    @property
    def expired_client(self) -> tuple[str, str]:
        return self.path("expired.crt"), self.path("expired.key")


def make_certs(directory: str) -> LabCerts:
    os.makedirs(directory, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _ssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
             "-subj", f"/CN=tortie lab {ca}", cwd=directory)
    with open(os.path.join(directory, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    with open(os.path.join(directory, "client.ext"), "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    for name, ext, days in (("server", "server.ext", "2"), ("client", "client.ext", "2"),
                            ("expired", "client.ext", "-1")):  # -1: notAfter before notBefore
        _ssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=tortie-{name}",
             cwd=directory)
        _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", days, "-extfile", ext, cwd=directory)
    for name in os.listdir(directory):
        if name.endswith(".key"):
            os.chmod(os.path.join(directory, name), 0o600)
    return LabCerts(directory)
