"""A real Prometheus server scrapes a real reward service the way the Helm chart sets it up.

The chart's ServiceMonitor (and its prometheus.io annotations) describe one scrape job per
service: job label = the component (``reward``), path ``/metrics`` over HTTP on the service's
metrics port; tests/deploy checks the chart renders exactly that. Here the same job runs
against ``alignd serve reward`` on loopback, and the RPCs made are read back through the query
API, as a dashboard would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_run import METRICS_PATH, get_json, query_until, running_prometheus, scrape_job

from alignd import RewardClient

JOB = "reward"
"""The scrape job the chart describes for the reward service (job label = component)."""


@pytest.fixture
def prometheus_server(prometheus, reward_process, tmp_path) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``reward_process`` (temporary storage); its URL."""
    job = scrape_job(JOB, f"127.0.0.1:{reward_process.metrics_port}")
    with running_prometheus(prometheus, [job], tmp_path) as url:
        yield url


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
