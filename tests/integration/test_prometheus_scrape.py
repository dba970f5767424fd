"""A real Prometheus server scrapes a real reward service the way the Helm chart sets it up.

The chart's ServiceMonitor (and its prometheus.io annotations) describe one scrape job per
service: job label = the component (``reward``), path ``/metrics`` over HTTP on the service's
metrics port; tests/deploy checks the chart renders exactly that. Here the same job runs
against ``alignd serve reward`` on loopback, and the RPCs made are read back through the query
API, as a dashboard would.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from alignd import RewardClient
from alignd.local import free_port

JOB, METRICS_PATH = "reward", "/metrics"
"""The scrape job the chart describes for the reward service (job label = component)."""
POLL_S = 30.0


def scrape_config(target: str) -> dict:
    """Prometheus configuration with the chart's job for ``target`` (host:metrics-port)."""
    job = {
        "job_name": JOB,
        "metrics_path": METRICS_PATH,
        "scheme": "http",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [target]}],
    }
    return {"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus_server(prometheus, reward_process, tmp_path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``reward_process`` (temporary storage); its URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(f"127.0.0.1:{reward_process.metrics_port}")))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, tmp_path / "prometheus.log")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + POLL_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus not ready after {POLL_S:.0f}s: {log.read_text()[-2000:]}")


def query_until(url: str, promql: str, expected: float) -> list[dict]:
    """Polls the instant-query API until ``promql`` has one series equal to ``expected``."""
    deadline, result = time.monotonic() + POLL_S, []
    while time.monotonic() < deadline:
        body = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body["status"] == "success", body
        result = body["data"]["result"]
        if len(result) == 1 and float(result[0]["value"][1]) == expected:
            return result
        time.sleep(0.5)
    pytest.fail(f"{promql}: wanted {expected}, still {result} after {POLL_S:.0f}s")


def test_prometheus_scrapes_the_reward_rpc_counters(prometheus_server, reward_process):
    with RewardClient(reward_process.target) as client:
        for _ in range(3):
            client.score(["How are you?", "Hi"], ["Great, thanks!", "Hello"])
    scores = query_until(
        prometheus_server,
        f'alignd_rpc_requests_total{{job="{JOB}",grpc_method="Score",grpc_code="OK"}}',
        3.0,
    )
    labels = scores[0]["metric"]
    assert labels["grpc_service"] == "alignd.v1.RewardService"
    assert labels["instance"] == f"127.0.0.1:{reward_process.metrics_port}"
    query_until(prometheus_server, f'up{{job="{JOB}"}}', 1.0)
    query_until(
        prometheus_server,
        f'alignd_rpc_duration_seconds_count{{job="{JOB}",grpc_method="Score"}}',
        3.0,
    )
    targets = get_json(f"{prometheus_server}/api/v1/targets")["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"], t["scrapeUrl"]) for t in targets] == [
        (JOB, "up", f"http://127.0.0.1:{reward_process.metrics_port}{METRICS_PATH}")
    ]
