"""A real non-Python client (grpcurl) lists, health-checks and calls a served service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from alignd import RewardClient
from alignd.local import LocalService, free_port


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_grpcurl_lists_services_through_reflection(grpcurl, reward_process):
    result = run([grpcurl, "-plaintext", reward_process.target, "list"])
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "alignd.v1.RewardService" in services
    assert "grpc.health.v1.Health" in services

    described = run(
        [grpcurl, "-plaintext", reward_process.target, "describe", "alignd.v1.RewardService"]
    )
    assert (
        "rpc Score ( .alignd.v1.ScoreRequest ) returns ( .alignd.v1.ScoreResponse );"
        in described.stdout
    )


def test_grpcurl_health_check_reports_serving_per_service(grpcurl, reward_process):
    for service in ("alignd.v1.RewardService", ""):
        body = json.dumps({"service": service})
        result = run(
            [
                grpcurl,
                "-plaintext",
                "-d",
                body,
                reward_process.target,
                "grpc.health.v1.Health/Check",
            ]
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}
    unknown = run(
        [grpcurl, "-plaintext", "-d", '{"service": "nope"}', reward_process.target,
         "grpc.health.v1.Health/Check"]
    )  # fmt: skip
    assert unknown.returncode != 0
    assert "NotFound" in unknown.stderr or "NOT_FOUND" in unknown.stderr


def test_grpcurl_get_info_returns_the_model_and_limits(grpcurl, reward_process, tiny_models):
    result = run([grpcurl, "-plaintext", "-d", "{}", reward_process.target,
                  "alignd.v1.RewardService/GetInfo"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["server"]["service"] == "alignd.v1.RewardService"
    assert info["server"]["model"]["path"] == str(tiny_models.classifier)
    assert info["server"]["limits"]["max_batch_size"] == 64, (
        info
    )  # grpcurl prints proto field names
    assert info["scorers"][0]["is_default"] is True


def test_grpcurl_scores_with_a_json_body(grpcurl, reward_process):
    body = json.dumps(
        {
            "items": [
                {"prompt": "How are you?", "response": "Great, thanks!"},
                {"chat": {"messages": [{"role": "user", "content": "Hi"}]}, "response": "Hello"},
            ]
        }
    )
    result = run([grpcurl, "-plaintext", "-d", body, reward_process.target,
                  "alignd.v1.RewardService/Score"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)["scores"]
    with RewardClient(reward_process.target) as client:
        expected = client.score(["How are you?", [{"role": "user", "content": "Hi"}]],
                                ["Great, thanks!", "Hello"])  # fmt: skip
    assert len(scores) == 2
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)

    bad = run([grpcurl, "-plaintext", "-d", '{"items": []}', reward_process.target,
               "alignd.v1.RewardService/Score"])  # fmt: skip
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr
    assert "items: must not be empty" in bad.stderr


def test_sigterm_drains_and_exits_cleanly(tiny_models, tmp_path):
    log = tmp_path / "reference.log"
    service = LocalService("reference", ["--model", str(tiny_models.causal_lm),
                                         "--metrics-port", "-1"], log_file=log)  # fmt: skip
    service.start()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(30) == 0
    text = log.read_text()
    assert "shutting down" in text
    assert "stopped" in text


@pytest.mark.slow
def test_alignd_serve_reward_with_the_default_model_answers_grpcurl(
    grpcurl, prepared_home, tmp_path
):
    """The documented command, as a user types it: `alignd serve reward` (bundled MiniLM)."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    alignd = Path(sys.executable).parent / "alignd"
    env = {**os.environ, "ALIGND_HOME": str(prepared_home)}
    with (tmp_path / "reward.log").open("wb") as log:
        process = subprocess.Popen(
            [alignd, "serve", "reward", "--port", str(port), "--metrics-port", "-1"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with RewardClient(target) as client:
            client.wait_ready(120)
            assert client.info().scorers[0].model.name == "minilm-l6"
        listed = run([grpcurl, "-plaintext", target, "list"])
        assert "alignd.v1.RewardService" in listed.stdout.split()
        body = json.dumps({"service": "alignd.v1.RewardService"})
        health = run([grpcurl, "-plaintext", "-d", body, target, "grpc.health.v1.Health/Check"])
        assert json.loads(health.stdout) == {"status": "SERVING"}
    finally:
        process.terminate()
        assert process.wait(30) == 0
