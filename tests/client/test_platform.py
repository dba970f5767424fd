"""alignd.Platform: construction and validation from arguments, YAML and the environment;
cached clients; status of real services; stopping the processes a state file lists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import alignd
from alignd.channel import TLSConfig
from alignd.cli import main
from alignd.local import free_port
from alignd.platform import (
    PlatformConfigError,
    PlatformState,
    ProcessRecord,
    ServiceStatus,
    read_token,
    state_path,
    stop_local,
)

ENV = [
    "ALIGND_GENERATION_TARGET",
    "ALIGND_REWARD_TARGET",
    "ALIGND_REFERENCE_TARGET",
    "ALIGND_TRAINER_TARGET",
    "ALIGND_TOKEN",
    "ALIGND_TOKEN_FILE",
    "ALIGND_TLS_CA",
    "ALIGND_TLS_CLIENT_CERT",
    "ALIGND_TLS_CLIENT_KEY",
    "ALIGND_TLS_SERVER_NAME",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_arguments_give_the_targets_of_each_role():
    platform = alignd.Platform(["127.0.0.1:1", "127.0.0.1:2"], reward="127.0.0.1:3")
    assert platform.generation_targets == ["127.0.0.1:1", "127.0.0.1:2"]
    assert platform.roles == ["generation", "reward"]
    assert platform.targets["reference"] == []
    assert alignd.Platform("127.0.0.1:1").generation_targets == ["127.0.0.1:1"]


def test_a_platform_needs_at_least_one_service():
    with pytest.raises(PlatformConfigError, match="no service configured"):
        alignd.Platform()


def test_a_target_with_spaces_is_rejected_naming_the_role():
    with pytest.raises(PlatformConfigError, match=r"(?m)^  reward: String should match"):
        alignd.Platform(reward="127.0.0.1: 50052")


def test_token_and_token_file_are_exclusive(tmp_path):
    token_file = write(tmp_path / "token", "secret\n")
    with pytest.raises(PlatformConfigError, match="not both"):
        alignd.Platform(reward="127.0.0.1:1", token="t", token_file=token_file)


def test_the_token_is_the_first_non_empty_line_of_the_file(tmp_path):
    assert read_token(write(tmp_path / "token", "\n  current \nprevious\n")) == "current"
    with pytest.raises(PlatformConfigError, match="holds no token"):
        read_token(write(tmp_path / "empty", "\n \n"))


def test_clients_are_created_lazily_cached_and_closed():
    platform = alignd.Platform(["127.0.0.1:1", "127.0.0.1:2"], trainer="127.0.0.1:3", timeout=7)
    assert platform._clients == {}
    replicas = platform.generation_clients()
    assert [c.target for c in replicas] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert all(isinstance(c, alignd.GenerationClient) for c in replicas)
    assert platform.generation is replicas[0]
    assert isinstance(platform.trainer, alignd.TrainerClient)
    assert platform.trainer is platform.trainer
    assert platform.trainer.timeout == 7
    with pytest.raises(LookupError, match=r"no reward service \(it has: generation, trainer\)"):
        _ = platform.reward
    platform.close()
    assert platform._clients == {}


def test_yaml_with_replicas_tls_and_a_token_file(tmp_path):
    write(tmp_path / "token", "s3cret\n")
    path = write(
        tmp_path / "platform.yaml",
        """\
        services:
          generation: [gen-0:50051, gen-1:50051]
          reward: reward:50052
          trainer: trainer:50054
        tls:
          ca: ca.pem
          cert: /abs/client.pem
          key: client.key
          server_name: alignd.internal
        token_file: token
        """,
    )
    platform = alignd.Platform.from_yaml(path)
    assert platform.generation_targets == ["gen-0:50051", "gen-1:50051"]
    assert platform.targets["reward"] == ["reward:50052"]
    assert platform.roles == ["generation", "reward", "trainer"]
    assert platform.tls == TLSConfig(
        tmp_path / "ca.pem", Path("/abs/client.pem"), tmp_path / "client.key", "alignd.internal"
    )
    assert platform.token_file == tmp_path / "token"
    assert platform._token == "s3cret"


def test_yaml_with_one_generation_target_and_an_inline_token(tmp_path):
    path = write(tmp_path / "p.yaml", "services: {generation: g:1}\ntoken: abc\n")
    platform = alignd.Platform.from_yaml(path)
    assert platform.generation_targets == ["g:1"]
    assert platform._token == "abc"
    assert platform.tls is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: {reward: [a:1, b:2]}", "services.reward: Input should be a valid string"),
        ("services: {generation: [a:1, 'b 2']}", "services.generation.1: String should match"),
        ("services: {critic: c:1}", "services.critic: Extra inputs are not permitted"),
        ("servics: {reward: r:1}", "services: Field required"),
        ("services: {}", "services: no service configured"),
        ("services: {reward: r:1}\ntls: {cert: c.pem}", "tls: cert and key must be given"),
        ("services: {reward: r:1}\ntoken: t\ntoken_file: f", "token_file: give token or"),
        ("services: [reward]", "services: Input should be a valid dictionary"),
        ("- just\n- a list", "expected a mapping"),
        ("services: {reward: r:1", "not YAML"),
    ],
)
def test_bad_yaml_is_an_error_naming_the_field(tmp_path, text, message):
    path = write(tmp_path / "platform.yaml", text)
    with pytest.raises(PlatformConfigError) as err:
        alignd.Platform.from_yaml(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_environment_gives_targets_token_and_tls(clean_env):
    clean_env.setenv("ALIGND_GENERATION_TARGET", "g0:50051, g1:50051")
    clean_env.setenv("ALIGND_REFERENCE_TARGET", "ref:50053")
    clean_env.setenv("ALIGND_TOKEN", "tok")
    clean_env.setenv("ALIGND_TLS_CA", "/etc/alignd/ca.pem")
    platform = alignd.Platform.from_env()
    assert platform.generation_targets == ["g0:50051", "g1:50051"]
    assert platform.roles == ["generation", "reference"]
    assert platform._token == "tok"
    assert platform.tls == TLSConfig(ca_cert=Path("/etc/alignd/ca.pem"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "ALIGND_{GENERATION,REWARD,REFERENCE,TRAINER}_TARGET: no service configured"),
        ({"ALIGND_REWARD_TARGET": "r :1"}, "ALIGND_REWARD_TARGET: String should match"),
        (
            {"ALIGND_REWARD_TARGET": "r:1", "ALIGND_TLS_CLIENT_CERT": "c.pem"},
            "ALIGND_TLS_CLIENT_CERT, ALIGND_TLS_CLIENT_KEY: cert and key must be given together",
        ),
        (
            {"ALIGND_REWARD_TARGET": "r:1", "ALIGND_TOKEN": "t", "ALIGND_TOKEN_FILE": "f"},
            "ALIGND_TOKEN_FILE: give token or token_file, not both",
        ),
    ],
)
def test_bad_environment_is_an_error_naming_the_variable(clean_env, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(PlatformConfigError, match="environment") as err:
        alignd.Platform.from_env()
    assert message in str(err.value)


def test_state_file_round_trip(tmp_path):
    record = ProcessRecord(pid=1, target="127.0.0.1:9", metrics_port=10, model="m", log="l.log")
    state = PlatformState(services={"reward": "127.0.0.1:9"}, processes={"reward": record})
    state_path(tmp_path).write_text(state.model_dump_json())
    platform = alignd.Platform.from_state(tmp_path)
    assert platform.targets["reward"] == ["127.0.0.1:9"]
    assert platform.processes == {"reward": record}
    assert platform.directory == tmp_path
    with pytest.raises(FileNotFoundError, match="no local platform"):
        alignd.Platform.from_state(tmp_path / "elsewhere")


def test_status_reports_health_model_engine_and_weights_version(serve):
    generation, reward = serve("generation"), serve("reward")
    closed = f"127.0.0.1:{free_port()}"
    with alignd.Platform(generation.target, reward=reward.target, trainer=closed) as platform:
        gen, rew, trainer = platform.status(timeout=2)
    assert gen == ServiceStatus(
        "generation", generation.target, "SERVING", "tiny-causal-lm", "hf", weights_version=0
    )
    assert rew == ServiceStatus("reward", reward.target, "SERVING", "tiny-classifier")
    assert (trainer.target, trainer.serving) == (closed, False)
    assert trainer.health in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert trainer.detail


def test_status_command_prints_a_table_and_fails_unless_all_serve(serve, tmp_path, capsys):
    reward = serve("reward")
    good = write(tmp_path / "good.yaml", f"services: {{reward: '{reward.target}'}}")
    assert main(["status", "--config", str(good)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["ROLE", "TARGET", "HEALTH", "MODEL", "ENGINE", "WEIGHTS"]
    assert row.split() == ["reward", reward.target, "SERVING", "tiny-classifier", "-", "-"]
    assert header.index("HEALTH") == row.index("SERVING")  # aligned columns

    closed = f"127.0.0.1:{free_port()}"
    bad = write(
        tmp_path / "bad.yaml", f"services: {{reward: '{reward.target}', trainer: '{closed}'}}"
    )
    assert main(["status", "--config", str(bad), "--timeout", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[2] == "SERVING"
    assert lines[2].split()[:2] == ["trainer", closed]
    assert lines[2].split()[2] != "SERVING"


def test_status_and_down_without_a_platform_fail_clearly(tmp_path, capsys):
    assert main(["status", "--dir", str(tmp_path)]) == 1
    assert main(["down", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count(f"no local platform in {tmp_path}") == 2
    bad = write(tmp_path / "bad.yaml", "services: {}")
    assert main(["status", "--config", str(bad)]) == 1
    assert "services: no service configured" in capsys.readouterr().err


def fake_service(role: str, ignore_sigterm: bool = False) -> subprocess.Popen:
    """A process whose command line names ``alignd_server.ROLE`` (as a service's does); with
    ``ignore_sigterm``, it prints ``SIGTERM`` on each SIGTERM and keeps running."""
    code = "import signal, sys, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM', flush=True))\n"
    code += "print('ready', flush=True)\ntime.sleep(120)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code, f"alignd_server.{role}"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout.readline() == b"ready\n"
    return process


def write_state(directory: Path, pids: dict[str, int]) -> Path:
    records = {
        role: ProcessRecord(pid=pid, target="127.0.0.1:1", metrics_port=-1, model="m", log="l")
        for role, pid in pids.items()
    }
    state = PlatformState(services={r: "127.0.0.1:1" for r in pids}, processes=records)
    path = state_path(directory)
    path.write_text(state.model_dump_json())
    return path


def test_stop_local_terminates_then_kills_and_removes_the_state_file(tmp_path, caplog):
    polite, stubborn = fake_service("reward"), fake_service("trainer", ignore_sigterm=True)
    try:
        path = write_state(tmp_path, {"reward": polite.pid, "trainer": stubborn.pid})
        outcome = stop_local(tmp_path, timeout=1.0)
        assert outcome == {"reward": "stopped", "trainer": "killed"}
        assert polite.wait(5) == -signal.SIGTERM
        assert stubborn.wait(5) == -signal.SIGKILL
        assert stubborn.stdout.read() == b"SIGTERM\n"  # it got SIGTERM first, and outlived it
        # SIGKILL came once the timeout after SIGTERM had run out, and only to the stubborn one.
        killed = f"trainer (pid {stubborn.pid}) did not stop in 1s; killing it"
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [killed]
        assert not path.exists()
    finally:
        for process in (polite, stubborn):
            process.kill()
            process.wait()


def test_stop_local_leaves_a_pid_that_is_no_longer_the_service_alone(tmp_path):
    other = fake_service("reference")  # the pid was reused by another program
    try:
        write_state(tmp_path, {"reward": other.pid, "trainer": os.getpid()})
        assert stop_local(tmp_path, timeout=1.0) == {
            "reward": "not running",
            "trainer": "not running",
        }
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
