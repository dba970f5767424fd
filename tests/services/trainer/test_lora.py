"""LoRA training: adapters train, the merged model leaves the trainer, resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainer_service import atol

from alignd import ReferenceClient, TrainBatch, TrainerClient, losses
from alignd.clients.trainer import LoraConfig
from alignd.errors import InvalidArgumentError
from alignd_server.common.models import load_causal_lm, load_sequence_classifier, resolve_dtype

ROWS = [np.array([5, 6, 7, 8, 9, 10]), np.array([11, 12, 13, 14, 15, 16])]
SFT = TrainBatch(ROWS, [2, 3])
LORA = LoraConfig(r=4, alpha=8.0)


def steps(trainer: TrainerClient, count: int) -> None:
    for _ in range(count):
        trainer.forward_backward(SFT, losses.CrossEntropy())
        trainer.optim_step()


def test_lora_trains_only_adapters_and_saves_the_merged_model(serve, tiny_models, tmp_path, dtype):
    with TrainerClient(serve("trainer").target) as trainer:
        full = trainer.initialize(tiny_models.causal_lm, lr=1e-2, dtype=dtype).trainable_parameters
        adapted = trainer.initialize(tiny_models.causal_lm, lr=1e-2, lora=LORA, seed=2, dtype=dtype)
        config = load_causal_lm(tiny_models.causal_lm).model.config
        # Each linear layer (in → out) of each block gets A (r, in) and B (out, r).
        h, i = config.hidden_size, config.intermediate_size
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
        per_block = sum(LORA.r * (n_in + n_out) for n_in, n_out in shapes)
        assert adapted.trainable_parameters == config.num_hidden_layers * per_block
        assert adapted.trainable_parameters < full / 10
        first = trainer.forward_backward(SFT, losses.CrossEntropy()).loss
        trainer.optim_step()
        steps(trainer, 5)
        assert trainer.forward_backward(SFT, losses.CrossEntropy()).loss < first - 0.1
        trainer.optim_step()
        trained = trainer.forward(SFT)["logprobs"]
        trainer.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter.safetensors").is_file()
    # The checkpoint's model is the merged one: transformers and the services load it as is.
    with ReferenceClient(serve("reference", model=str(tmp_path / "ckpt")).target) as reference:
        served = reference.logprobs(ROWS, [2, 3])
    for a, b in zip(served, trained, strict=True):  # merging rounds W + BA to the dtype
        np.testing.assert_allclose(a, b, atol=atol(dtype, 1e-5))
    base = load_causal_lm(tiny_models.causal_lm).model.state_dict()
    merged = load_causal_lm(tmp_path / "ckpt").model.state_dict()
    assert set(merged) == set(base)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    frozen = base["model.embed_tokens.weight"].to(resolve_dtype(dtype)).float()  # as trained
    torch.testing.assert_close(merged["model.embed_tokens.weight"], frozen)


def test_lora_resume_is_exact(serve, tiny_models, tmp_path, dtype):
    options = dict(lr=1e-2, lora=LoraConfig(r=2, dropout=0.0), seed=5, max_grad_norm=1.0,
                   dtype=dtype)  # fmt: skip
    with TrainerClient(serve("trainer").target) as trainer:
        trainer.initialize(tiny_models.causal_lm, **options)
        steps(trainer, 4)
        expected = trainer.forward(SFT)["logprobs"]
        trainer.initialize(tiny_models.causal_lm, **options)  # re-initialising starts over
        steps(trainer, 2)
        trainer.save_checkpoint(tmp_path / "ckpt")
        trainer.initialize(tiny_models.causal_lm, **options)
        assert trainer.load_checkpoint(tmp_path / "ckpt").step == 2
        steps(trainer, 2)
        got = trainer.forward(SFT)["logprobs"]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_lora_reward_model_trains_its_fresh_head(serve, tiny_models, tmp_path, dtype):
    pairs = TrainBatch([[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]], [0, 0, 0, 0])
    with TrainerClient(serve("trainer").target) as trainer:
        trainer.initialize(
            tiny_models.classifier, "sequence_classifier", lr=1e-2, lora=LORA, dtype=dtype
        )
        first = trainer.forward_backward(pairs, losses.BradleyTerry())
        trainer.optim_step()
        for _ in range(5):
            trainer.forward_backward(pairs, losses.BradleyTerry())
            trainer.optim_step()
        last = trainer.forward_backward(pairs, losses.BradleyTerry())
        assert last.loss < first.loss
        rewards = trainer.forward(pairs, ["rewards"])["rewards"]
        trainer.save_checkpoint(tmp_path / "rm")
    model = load_sequence_classifier(tmp_path / "rm").model
    with torch.no_grad():
        score = model(torch.tensor([[5, 6, 7]])).logits[0, 0]
    assert float(score) == pytest.approx(float(rewards[0]), abs=atol(dtype, 1e-5))


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (LoraConfig(r=0), r"lora\.r: 0 must be in 1 \.\. 1024"),
        (LoraConfig(r=4, alpha=-1.0), r"lora\.alpha: must be in \(0, 10000\], got -1\.0"),
        (LoraConfig(r=4, dropout=1.0), r"lora\.dropout: 1\.0 is outside \[0, 1\)"),
        (LoraConfig(r=4, target_modules=["nope"]), r"lora\.target_modules: .*nope"),
    ],
)
def test_bad_lora_configs_name_the_field(serve, tiny_models, lora, message):
    with TrainerClient(serve("trainer").target) as trainer:
        with pytest.raises(InvalidArgumentError, match=message):
            trainer.initialize(tiny_models.causal_lm, lora=lora)


def test_lora_checkpoint_needs_the_same_base(serve, tiny_models, tmp_path, dtype):
    with TrainerClient(serve("trainer").target) as trainer:
        trainer.initialize(tiny_models.causal_lm, lora=LORA, dtype=dtype)
        steps(trainer, 1)
        trainer.save_checkpoint(tmp_path / "ckpt")
        trainer.initialize(tiny_models.causal_lm, dtype=dtype)  # full fine-tuning: merged model
        with pytest.raises(InvalidArgumentError, match=r"load_optimizer: .*\(LoRA and full"):
            trainer.load_checkpoint(tmp_path / "ckpt")
        trainer.load_checkpoint(tmp_path / "ckpt", load_optimizer=False)
        trainer.initialize(tmp_path / "ckpt", lora=LORA, dtype=dtype)  # adapters on another base
        with pytest.raises(InvalidArgumentError, match="adapters were trained on"):
            trainer.load_checkpoint(tmp_path / "ckpt")
