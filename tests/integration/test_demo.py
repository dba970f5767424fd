"""``alignd demo --quick``: the main job's whole pipeline on tiny models, as a real CLI run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


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
