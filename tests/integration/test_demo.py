"""``alignd demo --quick``: the main job's whole pipeline on tiny models, as a real CLI run."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignd import ReferenceClient, RewardClient
from alignd.errors import AligndError

DEMO = [sys.executable, "-m", "alignd.cli", "demo", "--quick"]


def numbers(out: Path) -> dict:
    """Every job's metrics but the timings, and the evaluations, of a demo's output."""
    jobs = {}
    for job in ("sft", "reward_model", "ppo", "dpo"):
        rows = [json.loads(line) for line in (out / "runs" / job / "metrics.jsonl").open()]
        jobs[job] = [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")}
                     for r in rows]  # fmt: skip
    return {"jobs": jobs, "policies": json.loads((out / "summary.json").read_text())["policies"]}


def port_of(log: Path, stop: threading.Event) -> int | None:
    """The gRPC port a service's log says it listens on, once it says so."""
    while not stop.is_set():
        if log.exists() and (
            found := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        ):
            return int(found.group(1))
        time.sleep(0.2)
    return None


def load(out: Path, stop: threading.Event, sent: list[int]) -> None:
    """Another caller of the demo's reward and reference services, busy until ``stop``."""
    ports = {role: port_of(out / "logs" / f"{role}.log", stop) for role in ("reward", "reference")}
    if None in ports.values():
        return
    rng = random.Random(0)
    with (
        RewardClient(f"127.0.0.1:{ports['reward']}", retries=1) as reward,
        ReferenceClient(f"127.0.0.1:{ports['reference']}", retries=1) as reference,
    ):
        while not stop.is_set():
            n = rng.randint(1, 6)
            try:
                reward.score(
                    ["a prompt " * rng.randint(1, 9)] * n, ["so good " * rng.randint(1, 9)] * n
                )
                reference.logprobs([list(range(3, 3 + rng.randint(3, 60)))] * n, [2] * n)
                sent.append(n)
            except (AligndError, OSError):  # the demo stopped the services
                time.sleep(0.1)


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "demo", "--quick", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"sft", "ppo", "dpo"}
    assert [c["name"] for c in summary["checks"]] == [
        "reward model held-out accuracy",
        "oracle gain of PPO over SFT",
        "oracle gain of DPO over SFT",
    ]
    assert {job: info["steps"] for job, info in summary["jobs"].items()} == {
        "sft": 5, "reward_model": 10, "ppo": 2, "dpo": 5,
    }  # fmt: skip
    report = (out / "report.md").read_text()
    assert "| SFT |" in report and "![sft loss](plots/sft-loss.png)" in report
    assert (out / "plots" / "reward_model-accuracy.png").is_file()
    for name in ("sft", "reward_model", "ppo", "dpo"):
        assert (out / "configs" / f"{name}.yaml").is_file()
        assert (out / "runs" / name / "checkpoints" / "final" / "config.json").is_file()
    assert "oracle score" in result.stdout and "s in all" in result.stdout

    # The demo's jobs are deterministic: another run, while another caller keeps its reward
    # and reference services busy, gives the same numbers to the last bit.
    loaded = tmp_path / "loaded"
    stop, sent = threading.Event(), []
    caller = threading.Thread(target=load, args=(loaded, stop, sent))
    caller.start()
    try:
        busy = subprocess.run([*DEMO, "--output", str(loaded)], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    finally:
        stop.set()
        caller.join(30)
    assert busy.returncode == 0, busy.stderr[-3000:]
    assert len(sent) > 10
    assert numbers(loaded) == numbers(out)

    # A demo stopped before DPO continues from the jobs it finished.
    shutil.rmtree(out / "runs" / "dpo")
    again = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "demo", "--quick", "--resume", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    for title in ("SFT", "reward model", "PPO"):
        assert f"== {title}: done in an earlier run" in again.stdout
    assert "== DPO\n   5 steps in" in again.stdout
    resumed = json.loads((out / "summary.json").read_text())
    assert {job: info["steps"] for job, info in resumed["jobs"].items()} == {
        "sft": 5, "reward_model": 10, "ppo": 2, "dpo": 5,
    }  # fmt: skip
    assert resumed["jobs"]["sft"]["last"] == summary["jobs"]["sft"]["last"]
