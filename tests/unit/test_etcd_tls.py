"""What EtcdTLS.check() says about files it can judge without etcd (the CLI openssl makes
them; the handshake cases are in tests/integration/test_etcd_tls.py)."""
import shutil

import pytest

from felix_agent.datastore.etcd_tls import EtcdTLS, TLSConfigError, explain
from tests.lab.certs import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def test_good_files_pass(certs):
    EtcdTLS(certs.ca, *certs.client).check()
    EtcdTLS(certs.ca).check()  # server-auth only


@pytest.mark.parametrize("case, message", [
    ("missing ca", "etcd_ca_file /nonexistent/ca.crt: No such file"),
    ("not a ca", "not a PEM CA certificate"),
    ("key mismatch", "not a PEM certificate and its matching key"),
    ("expired", "the client certificate expired on"),
    ("cert without key", "set both or neither"),
])
def test_bad_files_are_named(certs, case, message):
    tls = {"missing ca": EtcdTLS("/nonexistent/ca.crt"),
           "not a ca": EtcdTLS(certs.client[1]),
           "key mismatch": EtcdTLS(certs.ca, certs.client[0], certs.server[1]),
           "expired": EtcdTLS(certs.ca, *certs.expired_client),
           "cert without key": EtcdTLS(certs.ca, certs.client[0])}[case]
    with pytest.raises(TLSConfigError) as e:
        tls.check()
    assert message in str(e.value)


def test_explain_names_the_setting():
    tls = EtcdTLS("/ca.pem")
    assert "not signed by the CA in /ca.pem" in explain(tls, Exception("Handshake failed: CERTIFICATE_VERIFY_FAILED"))
    assert "requires a client certificate" in explain(tls, Exception("Unwrap failed (TSI_DATA_CORRUPTED)"))
    assert "refused the client certificate /c.pem" in explain(EtcdTLS("/ca.pem", "/c.pem", "/k.pem"),
                                                              Exception("Unwrap failed (TSI_DATA_CORRUPTED)"))
    assert explain(None, Exception("Socket closed")) == "Socket closed"
