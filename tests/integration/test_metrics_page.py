"""The /metrics page of a real server passes promtool and counts RPCs by method and code."""

from __future__ import annotations

import subprocess
import urllib.request

from alignd import RewardClient


def test_metrics_page_passes_promtool(promtool, reward_process, tmp_path):
    with RewardClient(reward_process.target) as client:
        client.info()
        client.score(["a", "b", "c"], ["x", "y", "z"])
    url = f"http://127.0.0.1:{reward_process.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    assert (
        'alignd_rpc_requests_total{grpc_code="OK",grpc_method="Score",'
        'grpc_service="alignd.v1.RewardService"} 1.0' in page
    )
    assert "alignd_rpc_duration_seconds_bucket" in page
    for batcher_metric in (
        'alignd_batch_size_sum{batcher="reward:default"} 3.0',
        'alignd_batch_compute_seconds_count{batcher="reward:default"}',
        'alignd_queue_wait_seconds_count{batcher="reward:default"} 3.0',
        'alignd_queue_depth{batcher="reward:default"} 0.0',
    ):
        assert batcher_metric in page
    assert 'alignd_build_info{service="alignd.v1.RewardService"' in page
    page_file = tmp_path / "metrics.txt"
    page_file.write_text(page)
    with page_file.open() as stdin:
        result = subprocess.run(
            [promtool, "check", "metrics"], stdin=stdin, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stdout + result.stderr
