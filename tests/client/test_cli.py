"""The ``alignd`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignd.cli import main


def alignd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_models_list_prints_each_bundled_model_and_path(tmp_path, capsys):
    assert main(["models", "list", "--home", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["smollm2-135m", "minilm-l6"]
    assert str(tmp_path / "models" / "smollm2-135m") in lines[0]
    assert "not prepared" in lines[0]


def test_serve_help_lists_every_flag_with_its_environment_variable():
    result = alignd("serve", "reward", "--help")
    assert result.returncode == 0, result.stderr
    for flag, env in [
        ("--port", "ALIGND_PORT"),
        ("--metrics-port", "ALIGND_METRICS_PORT"),
        ("--auth-token-file", "ALIGND_AUTH_TOKEN_FILE"),
        ("--tls-client-ca", "ALIGND_TLS_CLIENT_CA"),
        ("--max-message-bytes", "ALIGND_MAX_MESSAGE_BYTES"),
        ("--model", "ALIGND_MODEL"),
    ]:
        assert flag in result.stdout
        assert env in result.stdout


def test_serve_rejects_bad_settings_before_starting():
    result = alignd("serve", "reward", "--tls-cert", "/nonexistent.crt", "--metrics-port", "-1")
    assert result.returncode == 2
    assert "tls_cert and tls_key must be given together" in result.stderr


def test_serve_unknown_role_is_an_error():
    result = alignd("serve", "critic")
    assert result.returncode == 2
    assert "invalid choice: 'critic'" in result.stderr


def test_version():
    result = alignd("--version")
    assert result.stdout.startswith("alignd ")


def test_serve_with_a_missing_model_fails_with_a_clear_message(tmp_path):
    missing = tmp_path / "no-such-model"
    result = alignd(
        "serve", "reward", "--model", str(missing), "--port", "0", "--metrics-port", "-1"
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_port_in_use_fails_with_a_clear_message(tiny_models):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = alignd("serve", "trainer", "--port", str(port), "--metrics-port", "-1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


def test_serve_with_a_mismatched_tls_pair_names_the_files(tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    result = alignd("serve", "trainer", "--port", "0", "--metrics-port", "-1",
                    "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
    assert result.returncode == 1
    assert f"tls_cert {cert} and tls_key {key} are not a usable" in result.stderr


def test_serve_on_a_busy_metrics_port_names_it():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = alignd("serve", "trainer", "--port", "0", "--metrics-port", str(port))
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_demo_off_policy_steps_reach_the_ppo_job_and_are_bounded(tmp_path, monkeypatch, capsys):
    import alignd.demo
    from alignd.demo import configs

    jobs = configs(tmp_path, "policy", "backbone", quick=True, off_policy_steps=1)
    assert jobs["ppo"].off_policy_steps == 1
    assert configs(tmp_path, "policy", "backbone", quick=True)["ppo"].off_policy_steps == 0
    seen = {}
    monkeypatch.setattr(alignd.demo, "run_demo", lambda **kwargs: seen.update(kwargs) or 0)
    assert main(["demo", "--quick", "--off-policy-steps", "2"]) == 0
    assert seen["off_policy_steps"] == 2
    with pytest.raises(SystemExit):
        main(["demo", "--off-policy-steps", "9"])
    assert "--off-policy-steps: invalid choice: 9" in capsys.readouterr().err
