"""The model-loading module: what it loads, what it reports and what it refuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import SafetensorError
from transformers import BertConfig, BertForSequenceClassification, BertModel

from alignd_server.common.models import (
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_dtype,
)
from alignd_server.common.tiny import CHAT_VOCAB_SIZE


def test_causal_lm_loads_in_eval_mode_and_describes_itself(tiny_models):
    loaded = load_causal_lm(tiny_models.causal_lm)
    assert loaded.path == tiny_models.causal_lm
    assert loaded.name == "tiny-causal-lm"
    assert loaded.architecture == "LlamaForCausalLM"
    assert loaded.num_parameters == sum(p.numel() for p in loaded.model.parameters())
    assert (loaded.dtype, loaded.device) == ("float32", "cpu")
    assert loaded.vocab_size == CHAT_VOCAB_SIZE
    assert loaded.has_chat_template
    assert loaded.eos_token_id == 2 and loaded.tokenizer.pad_token_id == 2
    assert not loaded.model.training
    ids = torch.tensor([[1, 40, 41, 42]])  # (B=1, T=4)
    with torch.no_grad():
        logits = loaded.model(ids).logits  # (1, 4, V)
    assert logits.shape == (1, 4, CHAT_VOCAB_SIZE)


def test_causal_lm_in_bfloat16(tiny_models):
    loaded = load_causal_lm(str(tiny_models.causal_lm), dtype="bfloat16")
    assert loaded.dtype == "bfloat16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_classifier_with_a_scalar_head(tiny_models):
    loaded = load_sequence_classifier(tiny_models.classifier)
    assert loaded.architecture == "BertForSequenceClassification"
    assert not loaded.has_chat_template
    assert loaded.eos_token_id == loaded.tokenizer.sep_token_id  # no eos: sep ends a sequence
    batch = loaded.tokenizer(["good answer", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = loaded.model(**batch).logits  # (B=2, 1)
    assert scores.shape == (2, 1)


@pytest.fixture
def backbone_dir(tiny_models, tmp_path):
    """The tiny classifier's encoder saved without a head, as all-MiniLM-L6-v2 ships."""
    path = tmp_path / "backbone"
    config = BertConfig.from_pretrained(tiny_models.classifier)
    BertModel(config).save_pretrained(path)
    load_tokenizer(tiny_models.classifier).save_pretrained(path)
    return path


def test_bare_backbone_gets_the_same_fresh_scalar_head_every_time(backbone_dir):
    rng_state = torch.random.get_rng_state()
    first = load_sequence_classifier(backbone_dir)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is untouched
    torch.rand(100)  # whatever the caller's RNG state, the head is the same
    second = load_sequence_classifier(backbone_dir)
    assert first.model.config.num_labels == 1
    assert torch.equal(first.model.classifier.weight, second.model.classifier.weight)


def test_classifier_with_several_labels_is_refused(tiny_models, tmp_path):
    config = BertConfig.from_pretrained(tiny_models.classifier, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    load_tokenizer(tiny_models.classifier).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="3 labels; a reward model needs exactly one"):
        load_sequence_classifier(tmp_path)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_sequence_classifier(tmp_path)


def test_pickle_only_directory_is_refused(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models.classifier, tmp_path / "pickled")
    model = BertForSequenceClassification.from_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(found pytorch_model.bin"):
        load_sequence_classifier(path)


def test_tokenizer_without_pad_pads_with_eos(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models.causal_lm, tmp_path / "nopad")
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    assert load_tokenizer(path).pad_token == "<|im_end|>"


def test_dtypes_and_devices_are_checked(tiny_models):
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        resolve_dtype("float64")
    with pytest.raises(ValueError, match="invalid device 'gpu7'"):
        load_causal_lm(tiny_models.causal_lm, device="gpu7")


@pytest.mark.parametrize("kind", ["causal_lm", "classifier", "backbone"])
def test_meta_loading_builds_the_same_structure_and_reads_no_weights(
    kind, tiny_models, backbone_dir, tmp_path
):
    """``meta``: the structure from the config on the meta device (what an FSDP rank that
    receives its shards builds), the same names, shapes and dtypes as a real load; the
    weights file is not read, so a damaged one does not stop it."""
    source = backbone_dir if kind == "backbone" else getattr(tiny_models, kind)
    load = load_causal_lm if kind == "causal_lm" else load_sequence_classifier
    real = load(source).model
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    (weights,) = damaged.glob("*.safetensors")
    weights.write_bytes(b"\x10" + b"\x00" * 7 + b"{")
    with pytest.raises(SafetensorError):
        load(damaged)
    loaded = load(damaged, meta=True)
    model = loaded.model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert (loaded.dtype, loaded.device) == ("float32", "cpu")
    assert loaded.num_parameters == sum(p.numel() for p in real.parameters())
    want = {n: (t.shape, t.dtype) for n, t in real.state_dict().items()}
    assert {n: (t.shape, t.dtype) for n, t in model.state_dict().items()} == want
    assert model.config._attn_implementation == real.config._attn_implementation
    assert not model.training
