"""Settings: defaults, ALIGND_ environment variables, CLI flags, validation."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from alignd_server.common.config import ServerSettings, add_settings_flags, settings_from_args
from alignd_server.reward.config import RewardSettings


def parse(argv: list[str]) -> RewardSettings:
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, RewardSettings)
    return settings_from_args(RewardSettings, parser.parse_args(argv))


def test_defaults_are_the_service_defaults(monkeypatch):
    for key in ("ALIGND_PORT", "ALIGND_MODEL", "ALIGND_METRICS_PORT"):
        monkeypatch.delenv(key, raising=False)
    settings = parse([])
    assert (settings.port, settings.metrics_port, settings.model) == (50052, 9092, "minilm-l6")
    assert settings.host == "127.0.0.1"


def test_flags_override_environment_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("ALIGND_PORT", "6000")
    monkeypatch.setenv("ALIGND_MAX_BATCH_SIZE", "8")
    settings = parse(["--port", "7000"])
    assert settings.port == 7000  # flag wins
    assert settings.max_batch_size == 8  # env wins over default


def test_every_field_has_a_flag_and_a_docstring():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, RewardSettings)
    flags = {a.dest for a in parser._actions}
    for name, field in RewardSettings.model_fields.items():
        assert name in flags
        assert field.description, f"{name} has no docstring"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "port"),
        (["--tls-cert", "/x.crt"], "tls_cert and tls_key must be given together"),
        (["--max-batch-size", "0"], "max_batch_size"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_field(argv, message):
    with pytest.raises(ValidationError, match=message):
        parse(argv)


def test_unknown_environment_fields_are_ignored_but_unknown_kwargs_rejected(monkeypatch):
    monkeypatch.setenv("ALIGND_NOT_A_SETTING", "1")
    assert parse([]).port > 0
    with pytest.raises(ValidationError, match="not_a_setting"):
        RewardSettings(not_a_setting=1)


def test_malloc_trim_is_on_by_default_where_glibc_has_it_and_refused_where_it_does_not(
    monkeypatch,
):
    from alignd_server.common import memory

    assert memory.trim_interval(None) == memory.AUTO_INTERVAL_S  # glibc, as on these machines
    assert memory.trim_interval(0) == 0 and memory.trim_interval(5) == 5
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # musl, macOS
    assert memory.trim_interval(None) == 0
    with pytest.raises(ValueError, match="malloc_trim_interval_s: this C library has no"):
        ServerSettings(malloc_trim_interval_s=60)
    assert ServerSettings(malloc_trim_interval_s=0).malloc_trim_interval_s == 0
