"""etcd over TLS with client certificates, for the agent and tortiectl.

aetcd (the pinned client) only opens plaintext gRPC channels, so `TLSClient` is an
aetcd.Client whose connect() opens a gRPC channel with TLS credentials instead; every other
call is aetcd's own.  `EtcdTLS.check()` runs before the first connection and turns what can
be known locally (a missing or unreadable file, a key that does not belong to the cert, a
client cert that has expired or is not valid yet) into an error naming the file and the
setting; `explain()` turns the handshake failures that only the server can reveal (a CA
that did not sign the server's certificate, a server that wants a client certificate) into
the same kind of message.
"""
from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import aetcd
import grpc
from aetcd import rpc, watcher


class TLSConfigError(ValueError):
    """A TLS setting cannot work; the message names the setting and the file."""


@dataclass(frozen=True)
class EtcdTLS:
    ca_file: str  # the CA that signed etcd's server certificate
    cert_file: str = ""  # this client's certificate (etcd --client-cert-auth wants one)
    key_file: str = ""

    def check(self) -> None:
        """Raise TLSConfigError for anything wrong that can be seen without etcd."""
        if bool(self.cert_file) != bool(self.key_file):
            raise TLSConfigError("etcd_cert_file and etcd_key_file go together: set both or neither")
        for setting, path in (("etcd_ca_file", self.ca_file), ("etcd_cert_file", self.cert_file),
                              ("etcd_key_file", self.key_file)):
            if not path:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise TLSConfigError(f"{setting} {path}: {e.strerror}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(self.ca_file)
        except (ssl.SSLError, ValueError) as e:
            raise TLSConfigError(f"etcd_ca_file {self.ca_file}: not a PEM CA certificate ({e})") from None
        if not self.cert_file:
            return
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            raise TLSConfigError(f"etcd_cert_file {self.cert_file} / etcd_key_file {self.key_file}: "
                                 f"not a PEM certificate and its matching key ({e.reason or e})") from None
        # The stdlib's certificate decoder (no extra dependency); only the dates are used.
        info = ssl._ssl._test_decode_cert(self.cert_file)  # type: ignore[attr-defined]
        now = time.time()
        not_after = ssl.cert_time_to_seconds(info["notAfter"])
        not_before = ssl.cert_time_to_seconds(info["notBefore"])
        if not_after < now:
            raise TLSConfigError(f"etcd_cert_file {self.cert_file}: the client certificate expired on "
                                 f"{info['notAfter']}; etcd will refuse it")
        if not_before > now:
            raise TLSConfigError(f"etcd_cert_file {self.cert_file}: the client certificate is not valid "
                                 f"before {info['notBefore']}")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file),
                                            private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))


def explain(tls: EtcdTLS | None, error: BaseException) -> str:
    """The connection error as a user should read it: what is wrong with which setting."""
    text = str(error)
    if tls is None:
        return text
    low = text.lower()
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return (f"TLS: etcd's server certificate is not signed by the CA in {tls.ca_file} "
                f"(etcd_ca_file), or does not name this endpoint ({text})")
    if "wrong_version_number" in low or "wrong version number" in low or "http/1" in low:
        return f"TLS: the endpoint does not speak TLS (a plaintext etcd? use an http:// endpoint) ({text})"
    # Under TLS 1.3 the server checks the client certificate after the client's side of the
    # handshake is done: its refusal reaches gRPC as a record it cannot decrypt (the alert,
    # "bad certificate", only shows in gRPC's own log).
    if any(m in low for m in ("tsi_data_corrupted", "unwrap failed", "certificate required", "bad certificate",
                              "unknown ca", "certificate expired", "handshake failed")):
        if not tls.cert_file:
            return ("TLS: etcd refused the connection: it requires a client certificate; set etcd_cert_file "
                    f"and etcd_key_file ({text})")
        return (f"TLS: etcd refused the client certificate {tls.cert_file} (etcd_cert_file): not signed by "
                f"a CA etcd trusts (its --trusted-ca-file), or expired ({text})")
    return text


class TLSClient(aetcd.Client):
    """aetcd.Client over a TLS channel (with the client certificate when one is set)."""

    def __init__(self, tls: EtcdTLS, **kw):
        super().__init__(**kw)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        # One channel per client; aetcd's own connect() would open a plaintext one.
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._tls.credentials(),
                                          options=self._options.items())
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                        metadata=self.metadata)
        self._connected.set()
