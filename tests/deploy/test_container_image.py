"""The service image built and run for real (scripts/container_smoke.sh).

A private dockerd builds docker/Dockerfile on a locally made Debian base (no registry to pull
from), runs the reward service as the chart does (non-root, read-only root filesystem, no
capabilities, the model volume mounted as ALIGND_HOME) and checks it with grpcurl: health,
reflection, a Score call, the metrics page, and a clean exit on SIGTERM. Needs root, dockerd
and debootstrap (apt-get install docker.io debootstrap); minutes the first time, the layer
cache (.cache/container) makes later runs quicker.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from deploy_tools import REPO

SCRIPT = REPO / "scripts" / "container_smoke.sh"


def missing_requirement() -> str | None:
    """Why the smoke test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to run its own dockerd"
    for tool, package in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install {package}"
    return None


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_service_image_serves_the_reward_api(tmp_path):
    reason = missing_requirement()
    if reason:
        pytest.skip(reason)
    log = tmp_path / "smoke.log"
    with log.open("w") as out:
        done = subprocess.run(
            ["bash", str(SCRIPT)], stdout=out, stderr=subprocess.STDOUT, timeout=1700,
            check=False,
        )  # fmt: skip
    output = log.read_text()
    assert done.returncode == 0, output[-6000:]
    for step in (
        "image runs as 10001:10001, has no compiler",
        "alignd.v1.RewardService SERVING",
        "reflection lists the service, Score returned two scores, /metrics counts it",
        "SIGTERM: stopped with exit code 0",
    ):
        assert step in output, output[-6000:]
