"""The chart's exec health probe (files/health_probe.py) against real servers.

It runs where the kubelet's gRPC probe cannot: over TLS and mutual TLS, with the pod's own
certificate, and on trainer nodes other than 0. Certificates are made by the test, for the
name the chart passes (the service's DNS name).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from chart_render import CHART
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from alignd.local import free_port

PROBE = CHART / "files" / "health_probe.py"
SERVER_NAME = "t-alignd-reward"
REWARD = "alignd.v1.RewardService"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory, issue_cert) -> Path:
    """What the chart mounts at /etc/alignd/tls: tls.crt, tls.key (for SERVER_NAME), ca.crt."""
    root = tmp_path_factory.mktemp("tls")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = issue_cert("alignd test CA", ca_key)
    cert = issue_cert(SERVER_NAME, key, ca, ca_key, names=(SERVER_NAME,))
    pem = serialization.Encoding.PEM
    (root / "ca.crt").write_bytes(ca.public_bytes(pem))
    (root / "tls.crt").write_bytes(cert.public_bytes(pem))
    (root / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return root


def probe(
    service: str,
    port: int,
    tls_dir: Path | str = "",
    mutual: str = "",
    server_name: str = SERVER_NAME,
    **env: str,
) -> int:
    """Runs the probe as the kubelet would; returns its exit status."""
    args = [sys.executable, str(PROBE), service, str(port), server_name, str(tls_dir), mutual]
    done = subprocess.run(args, capture_output=True, timeout=30, env=env or None, check=False)
    return done.returncode


def test_plaintext_probe_passes_only_for_the_served_service(serve):
    server = serve("reward")
    assert probe(REWARD, server.server.port) == 0
    assert probe("alignd.v1.TrainerService", server.server.port) != 0  # NOT_FOUND
    assert probe(REWARD, free_port()) != 0  # nothing listening


def test_mutual_tls_probe_presents_the_pods_certificate(serve, tls_dir):
    server = serve(
        "reward",
        tls_cert=tls_dir / "tls.crt",
        tls_key=tls_dir / "tls.key",
        tls_client_ca=tls_dir / "ca.crt",
    )
    port = server.server.port
    assert probe(REWARD, port, tls_dir, "mutual") == 0
    assert probe(REWARD, port, tls_dir, "") != 0  # no client certificate: refused
    assert probe(REWARD, port) != 0  # plaintext against TLS


def test_tls_probe_checks_the_certificate_and_its_name(serve, tls_dir, tmp_path, issue_cert):
    server = serve("reward", tls_cert=tls_dir / "tls.crt", tls_key=tls_dir / "tls.key")
    port = server.server.port
    assert probe(REWARD, port, tls_dir) == 0
    assert probe(REWARD, port, tls_dir, server_name="t-alignd-generation") != 0
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    other_ca = issue_cert("some other CA", ec.generate_private_key(ec.SECP256R1()))
    (stranger / "ca.crt").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    assert probe(REWARD, port, stranger) != 0


def test_trainer_nodes_other_than_zero_pass_without_a_server():
    port = free_port()
    assert probe("alignd.v1.TrainerService", port, ALIGND_NODE_RANK="0") != 0
    assert probe("alignd.v1.TrainerService", port, ALIGND_NODE_RANK="2") == 0
