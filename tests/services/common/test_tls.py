"""TLS and mutual TLS handshakes with certificates made by the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def _cert(subject: str, key, issuer=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger CA."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("alignd test CA", ca_key, ca=True)
    other_key = _key()
    other_ca = _cert("some other CA", other_key, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("alignd-server", server_key, ca, ca_key, server=True)
    client = _cert("alignd-client", client_key, ca, ca_key)
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
