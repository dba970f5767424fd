"""Reading a test server's Prometheus page (shared by the service tests)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from alignd_server.common.testing import ServerThread


def scrape(thread: ServerThread) -> dict[tuple[str, frozenset], float]:
    """Samples of the server's /metrics page, keyed by (name, labels)."""
    url = f"http://127.0.0.1:{thread.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def request_codes(thread: ServerThread, method: str) -> dict[str, float]:
    """``alignd_rpc_requests_total`` of one method, by status code name."""
    return {
        dict(labels)["grpc_code"]: value
        for (name, labels), value in scrape(thread).items()
        if name == "alignd_rpc_requests_total" and dict(labels)["grpc_method"] == method
    }
