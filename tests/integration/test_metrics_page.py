"""The /metrics page of a real server passes promtool and counts RPCs by method and code."""

from __future__ import annotations

import subprocess
import urllib.request

from alignd import RewardClient


def test_metrics_page_passes_promtool(promtool, reward_process, tmp_path):
    with RewardClient(reward_process.target) as client:
        client.info()
    url = f"http://127.0.0.1:{reward_process.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    assert (
        'alignd_rpc_requests_total{grpc_code="OK",grpc_method="GetInfo",'
        'grpc_service="alignd.v1.RewardService"} 1.0' in page
    )
    assert "alignd_rpc_duration_seconds_bucket" in page
    assert 'alignd_build_info{service="alignd.v1.RewardService"' in page
    page_file = tmp_path / "metrics.txt"
    page_file.write_text(page)
    with page_file.open() as stdin:
        result = subprocess.run(
            [promtool, "check", "metrics"], stdin=stdin, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stdout + result.stderr
