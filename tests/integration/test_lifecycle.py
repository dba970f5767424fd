"""Process lifecycle: SIGTERM during model loading, children that die at start-up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from alignd import RewardClient
from alignd.errors import AligndError
from alignd.local import LocalService, free_port


def test_sigterm_while_loading_exits_promptly(tiny_models, tmp_path):
    (tmp_path / "slow_scorer.py").write_text(
        "import time\ntime.sleep(60)  # a load that takes long\n"
        "def score(prompt, response, label):\n    return 0.0\n"
    )
    port = free_port()
    log = tmp_path / "reward.log"
    command = [sys.executable, "-m", "alignd_server.reward", "--port", str(port),
               "--model", str(tiny_models.classifier), "--metrics-port", "-1",
               "--scorers", "slow=function:slow_scorer:score"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        with RewardClient(f"127.0.0.1:{port}", retries=1) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # listening, models still loading
                with contextlib.suppress(AligndError):
                    if client.health(timeout=1) == "NOT_SERVING":
                        break
                time.sleep(0.1)
            else:
                pytest.fail("the server never answered NOT_SERVING")
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0  # a clean exit, well before the 60 s load would end
    finally:
        process.kill()
    text = log.read_text()
    assert "signalled during start-up" in text
    assert "shutting down" in text and "stopped" in text


def test_a_child_that_dies_at_start_up_fails_fast(tmp_path):
    service = LocalService("reward", ["--model", str(tmp_path / "missing"), "--metrics-port", "-1"],
                           log_file=tmp_path / "reward.log")  # fmt: skip
    # The exit is noticed as such, not as a service that never got ready in 120 s.
    with pytest.raises(RuntimeError, match="reward service exited with code 1"):
        service.start(ready_timeout=120)
    assert service.process.returncode == 1
    assert "neither a bundled model" in (tmp_path / "reward.log").read_text()


def test_stop_is_sigterm_then_kill(tiny_models, caplog):
    service = LocalService("trainer", ["--metrics-port", "-1"], stop_timeout=3)
    service.start()
    process = service.process
    process.send_signal(signal.SIGSTOP)  # a hung process ignores SIGTERM
    sent: list[int] = []
    send = process.send_signal
    process.send_signal = lambda sig: (sent.append(sig), send(sig))[1]  # kill() sends here too
    try:
        code = service.stop()
    finally:
        if process.poll() is None:
            send(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert sent == [signal.SIGTERM, signal.SIGKILL]
    # SIGKILL came only once the wait of stop_timeout after SIGTERM had run out.
    assert "trainer did not stop in 3s; killing it" in caplog.text
