"""TLS and mutual TLS handshakes with certificates made by the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from alignd import ReferenceClient, TLSConfig
from alignd.errors import UnavailableError


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory, issue_cert):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger CA."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = issue_cert("alignd test CA", ca_key)
    other_key = _key()
    other_ca = issue_cert("some other CA", other_key)
    server_key, client_key = _key(), _key()
    server = issue_cert("alignd-server", server_key, ca, ca_key, names=("localhost", "127.0.0.1"))
    client = issue_cert("alignd-client", client_key, ca, ca_key)
    paths = {
        "ca": _write(root / "ca", ca, ca_key)[0],
        "other_ca": _write(root / "other", other_ca, other_key)[0],
    }
    paths["server_cert"], paths["server_key"] = _write(root / "server", server, server_key)
    paths["client_cert"], paths["client_key"] = _write(root / "client", client, client_key)
    return paths


def test_tls_handshake_verifies_the_server(serve, pki):
    server = serve("reference", tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with ReferenceClient(server.target, tls=TLSConfig(ca_cert=pki["ca"])) as client:
        assert client.info().server.tls is True
    with ReferenceClient(server.target, tls=TLSConfig(ca_cert=pki["other_ca"]), retries=1) as bad:
        with pytest.raises(UnavailableError):
            bad.info(timeout=5)
    with ReferenceClient(server.target, retries=1) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.info(timeout=5)


def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(serve, pki):
    server = serve(
        "reference",
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
    )
    mtls = TLSConfig(
        ca_cert=pki["ca"], client_cert=pki["client_cert"], client_key=pki["client_key"]
    )
    with ReferenceClient(server.target, tls=mtls) as client:
        assert client.info().server.tls is True
    with ReferenceClient(server.target, tls=TLSConfig(ca_cert=pki["ca"]), retries=1) as anonymous:
        with pytest.raises(UnavailableError):
            anonymous.info(timeout=5)
