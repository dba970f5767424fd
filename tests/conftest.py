"""Session fixtures shared by the whole suite: tiny models and the prepared bundled models."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

logger = logging.getLogger(__name__)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="generation engine the generation service tests run against",
    )
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device the served models run on (e.g. cuda); tests may override it",
    )
    parser.addoption(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype of served and trained models; comparisons with values computed "
        "along another path take that dtype's tolerance",
    )


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> str:
    """The generation engine under test (``--engine``)."""
    return request.config.getoption("--engine")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The torch device of served models (``--device``, default ``cpu``)."""
    return request.config.getoption("--device")


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> str:
    """The parameter dtype of served and trained models (``--dtype``, default ``float32``)."""
    return request.config.getoption("--dtype")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """Tiny seeded Llama causal LM and BERT classifier, saved as real model directories."""
    from alignd_server.common.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def prepared_home() -> Path:
    """alignd home (``ALIGND_HOME``) with every bundled model prepared.

    Prepares into the real home, not a temporary one, so that the download and conversion
    (about half a minute) happen once per machine or CI cache, not once per run.
    """
    from alignd.settings import home
    from alignd_server.common.prepare import prepare_models

    prepare_models(home=home(), progress=logger.info)
    return home()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The storage root test servers get: this session's temporary directory, which holds the
    tiny models and every ``tmp_path``."""
    return tmp_path_factory.getbasetemp()


@pytest.fixture
def serve(tiny_models, storage_root, device, dtype) -> Iterator[Any]:
    """``serve(role, **settings)`` starts a real server for ``role`` on 127.0.0.1 (free ports,
    tiny model) in a background thread; every server is stopped after the test. Services that
    take paths get this session's temporary directory (tiny models, every ``tmp_path``) as their
    storage root; services that hold a model get ``--device`` and ``--dtype`` unless ``settings``
    name their own."""
    from alignd_server.common.config import ModelServerSettings, StorageServerSettings
    from alignd_server.common.testing import ServerThread
    from alignd_server.launch import ROLES, build_server

    running: list[ServerThread] = []
    root = str(storage_root)

    def _serve(role: str, **overrides: Any) -> ServerThread:
        settings_cls, _ = ROLES[role]
        model = tiny_models.classifier if role == "reward" else tiny_models.causal_lm
        values = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_s": 0.5}
        values["model"] = str(model)
        if issubclass(settings_cls, StorageServerSettings):
            values["storage_root"] = [root]
        if issubclass(settings_cls, ModelServerSettings):
            values.update(device=device, dtype=dtype)
        values.update(overrides)
        thread = ServerThread(build_server(role, settings_cls(**values))).start()
        running.append(thread)
        return thread

    yield _serve
    for thread in running:
        thread.stop()


@pytest.fixture(scope="session")
def issue_cert():
    """``issue_cert(subject, key, issuer=None, issuer_key=None, *, names=())`` makes a test
    certificate: a self-signed CA without ``issuer``, else a leaf it signs, valid for an hour
    around now, with ``names`` (DNS names or IP addresses) as subject alternative names."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    def alternative(name: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name)

    def issue(subject: str, key, issuer=None, issuer_key=None, *, names=()):
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if names:
            san = x509.SubjectAlternativeName([alternative(n) for n in names])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    return issue
