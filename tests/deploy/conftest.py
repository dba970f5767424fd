"""Fixtures of the deployment tests: helm (fetched once) and the chart rendered with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from chart_render import CHART, Manifest, render_chart
from deploy_tools import ToolUnavailable, fetch_helm


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of the helm binary (fetched into .cache/tools on first use)."""
    try:
        return str(fetch_helm())
    except ToolUnavailable as err:
        pytest.skip(f"helm unavailable: {err}")


Render = Callable[..., list[Manifest]]


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """``render(*values_files, sets=[...], kube_version=...)``: the chart's manifests."""

    def _call(
        *values: Path | str, sets: Sequence[str] = (), kube_version: str = "1.30.0"
    ) -> list[Manifest]:
        files = tuple(CHART / "ci" / v if isinstance(v, str) else v for v in values)
        return list(render_chart(helm, files, tuple(sets), kube_version))

    return _call
