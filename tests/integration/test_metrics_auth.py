"""The /metrics endpoint behind a bearer token, read over plain HTTP and by a real Prometheus.

With ``--metrics-auth-token-file`` the endpoint answers 401 without ``Authorization: Bearer``
and a listed token; Prometheus sends one from ``authorization.credentials_file``, as the
chart's ServiceMonitor ``authorization`` does. A job without the token sees the target down.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_run import get_json, query_until, running_prometheus, scrape_job

from alignd import RewardClient

TOKEN = "scrape-token-3f9c1e"


@pytest.fixture
def guarded_reward(start_reward, tmp_path):
    """A reward server whose /metrics accepts ``TOKEN`` (listed after a retired one, as
    during a rotation)."""
    token_file = tmp_path / "metrics-tokens"
    token_file.write_text(f"# scrapers\nretired-token-0a1b2c\n{TOKEN}\n")
    return start_reward("--metrics-auth-token-file", str(token_file))


def get_metrics(port: int, authorization: str | None = None) -> tuple[int, dict, str]:
    """GET /metrics: status, headers and body (also for error statuses)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def test_metrics_are_served_only_with_a_listed_bearer_token(guarded_reward):
    for authorization in [
        None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", TOKEN,
    ]:  # fmt: skip
        status, headers, body = get_metrics(guarded_reward.metrics_port, authorization)
        assert status == 401, authorization
        assert headers["WWW-Authenticate"].startswith("Bearer"), authorization
        assert "alignd_" not in body
    with RewardClient(guarded_reward.target) as client:
        client.score(["How are you?"], ["Great, thanks!"])
    status, _, body = get_metrics(guarded_reward.metrics_port, f"Bearer {TOKEN}")
    assert status == 200
    samples = {
        (s.name, s.labels.get("grpc_method"), s.labels.get("grpc_code")): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("alignd_rpc_requests_total", "Score", "OK")] == 1.0
    assert ("alignd_rpc_duration_seconds_count", "Score", None) in samples
    assert get_metrics(guarded_reward.metrics_port, "bearer retired-token-0a1b2c")[0] == 200


def test_prometheus_with_the_token_file_scrapes_and_without_it_sees_the_target_down(
    prometheus, guarded_reward, tmp_path
):
    # Prometheus sends the whole file (trailing whitespace trimmed): one token, no comments.
    token_file = tmp_path / "scrape-token"
    token_file.write_text(f"{TOKEN}\n")
    target = f"127.0.0.1:{guarded_reward.metrics_port}"
    jobs = [
        scrape_job(
            "reward", target, authorization={"type": "Bearer", "credentials_file": str(token_file)}
        ),
        scrape_job("reward-without-token", target),
    ]
    with RewardClient(guarded_reward.target) as client:
        for _ in range(2):
            client.score(["Hi"], ["Hello"])
    with running_prometheus(prometheus, jobs, tmp_path) as url:
        query_until(
            url, 'alignd_rpc_requests_total{job="reward",grpc_method="Score",grpc_code="OK"}', 2.0
        )
        query_until(url, 'up{job="reward"}', 1.0)
        query_until(url, 'up{job="reward-without-token"}', 0.0)
        targets = get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
        assert health["reward"] == ("up", "")
        assert health["reward-without-token"][0] == "down"
        assert "401" in health["reward-without-token"][1]
