"""A real Prometheus server on 127.0.0.1 and its HTTP API (shared by the scrape tests)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignd.local import free_port

METRICS_PATH = "/metrics"
POLL_S = 30.0
"""The first sample shows up ~5 s after start even with a 1 s scrape interval."""


def scrape_job(name: str, target: str, **options: Any) -> dict:
    """A scrape job reading ``target`` (host:metrics-port) over HTTP every second; ``options``
    add to it (e.g. ``authorization``)."""
    return {
        "job_name": name,
        "metrics_path": METRICS_PATH,
        "scheme": "http",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [target]}],
        **options,
    }


@contextmanager
def running_prometheus(binary: str, jobs: list[dict], workdir: Path) -> Iterator[str]:
    """Runs Prometheus with ``jobs`` (config, storage and log in ``workdir``); yields its URL
    once ready and stops it after."""
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


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
