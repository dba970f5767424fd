"""The local platform end to end: ``alignd up`` / ``status`` / ``down`` as real commands, and
``Platform.local`` in-process, with the four services as real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import alignd
from alignd.platform import ROLES

pytestmark = pytest.mark.slow  # each test starts real service processes (about 10 s or more)


def alignd_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def gone(pid: int) -> bool:
    """Whether ``pid`` exited (an unreaped zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def tiny_model_flags(tiny_models) -> list[str]:
    flags = []
    for role in ROLES:
        model = tiny_models.classifier if role == "reward" else tiny_models.causal_lm
        flags += [f"--model-{role}", str(model)]
    return flags


def test_up_status_clients_down(tiny_models, tmp_path):
    directory, home = tmp_path / "platform", tmp_path / "home"  # an empty home: nothing prepared
    up = alignd_cli(
        "up", "--dir", str(directory), "--home", str(home), *tiny_model_flags(tiny_models)
    )
    state_file = directory / "platform.json"
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        pids = {role: p["pid"] for role, p in state["processes"].items()}
        assert sorted(pids) == sorted(ROLES)
        for role in ROLES:  # alignd up has exited; its services keep running
            assert not gone(pids[role]), role
            assert state["processes"][role]["target"] in up.stdout
            assert (directory / "logs" / f"{role}.log").stat().st_size > 0
            assert os.getsid(pids[role]) == pids[role]  # each in its own session

        status = alignd_cli("status", "--dir", str(directory), timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        rows = [line.split() for line in status.stdout.splitlines()]
        assert rows[0] == ["ROLE", "TARGET", "HEALTH", "MODEL", "ENGINE", "WEIGHTS"]
        assert {row[0]: row[2] for row in rows[1:]} == dict.fromkeys(ROLES, "SERVING")
        assert rows[1][:6] == [
            "generation",
            state["services"]["generation"][0],
            "SERVING",
            "tiny-causal-lm",
            "hf",
            "0",
        ]

        with alignd.Platform.from_state(directory) as platform:
            platform.wait_ready(timeout=30)
            (score,) = platform.reward.score(["How are you?"], ["Fine, thanks."])
            assert np.isfinite(score)
            params = alignd.SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
            ((completion,),) = platform.generation.generate(["Hello"], params)
            assert len(completion.token_ids) == 3
            (row,) = platform.reference.tokenize(["Hello"], ["there"])
            (logps,) = platform.reference.logprobs([row.input_ids], [row.prompt_length])
            assert logps.shape == (len(row.input_ids) - row.prompt_length,)
            assert platform.trainer.info().server.service == "alignd.v1.TrainerService"

        again = alignd_cli("up", "--dir", str(directory), "--home", str(home), timeout=60)
        assert again.returncode == 1
        assert "already runs" in again.stderr
    finally:
        down = alignd_cli("down", "--dir", str(directory), timeout=120)
    assert down.returncode == 0, down.stderr
    assert {line.split()[0]: line.split()[1] for line in down.stdout.splitlines()[1:]} == (
        dict.fromkeys(ROLES, "stopped")
    )
    assert all(gone(pid) for pid in pids.values())
    assert not state_file.exists()
    assert alignd_cli("status", "--dir", str(directory), timeout=60).returncode == 1


def test_local_platform_in_process_stops_its_services_on_close(tiny_models, tmp_path):
    models = {"reward": tiny_models.classifier, "trainer": tiny_models.causal_lm}
    with alignd.Platform.local(tmp_path, roles=["reward", "trainer"], models=models) as platform:
        assert platform.roles == ["reward", "trainer"]
        assert platform.reward.health() == "SERVING"
        pids = {role: p.pid for role, p in platform.processes.items()}
        os.kill(pids["trainer"], signal.SIGKILL)
        status = alignd_cli("status", "--dir", str(tmp_path), "--timeout", "2", timeout=60)
        assert status.returncode == 1
        health = {line.split()[0]: line.split()[2] for line in status.stdout.splitlines()[1:]}
        assert health["reward"] == "SERVING"
        assert health["trainer"] != "SERVING"
    assert all(gone(pid) for pid in pids.values())
    assert not (tmp_path / "platform.json").exists()
    assert "listening on 127.0.0.1" in (tmp_path / "logs" / "reward.log").read_text()


def test_a_service_that_fails_to_start_stops_the_others(tiny_models, tmp_path):
    models = {"reward": tiny_models.classifier, "reference": tmp_path / "missing"}
    (tmp_path / "missing").mkdir()  # a directory, but no model in it
    with pytest.raises(
        RuntimeError, match=r"reference service exited with code 1; see .*reference\.log"
    ):
        alignd.Platform.local(tmp_path, roles=["reward", "reference"], models=models)
    assert not (tmp_path / "platform.json").exists()
    assert (tmp_path / "logs" / "reward.log").read_text().splitlines()[-1].endswith("] stopped")
