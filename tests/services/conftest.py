"""Fixtures that run real alignd servers on loopback with tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from alignd_server.common.testing import ServerThread
from alignd_server.launch import ROLES, build_server


@pytest.fixture
def serve(tiny_models) -> Iterator[Any]:
    """``serve(role, **settings)`` starts a real server for ``role`` on 127.0.0.1 (free ports,
    tiny model) in a background thread; every server is stopped after the test."""
    running: list[ServerThread] = []

    def _serve(role: str, **overrides: Any) -> ServerThread:
        settings_cls, _ = ROLES[role]
        model = tiny_models.classifier if role == "reward" else tiny_models.causal_lm
        values = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "grace_s": 0.5}
        values["model"] = str(model)
        values.update(overrides)
        thread = ServerThread(build_server(role, settings_cls(**values))).start()
        running.append(thread)
        return thread

    yield _serve
    for thread in running:
        thread.stop()
