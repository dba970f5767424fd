"""The typed TrainerClient drives a real trainer end to end."""

from __future__ import annotations

import numpy as np
import pytest

from alignd import GenerationClient, ReferenceClient, TrainBatch, TrainerClient, losses
from alignd.errors import InvalidArgumentError

ROWS = [np.array([5, 6, 7, 8, 9, 10]), np.array([11, 12, 13, 14, 15, 16])]


def test_sft_dpo_checkpoint_and_push_through_the_sdk(serve, tiny_models, tmp_path):
    generation = serve("generation")
    sft = TrainBatch(ROWS, [2, 3])
    with TrainerClient(serve("trainer", push_targets=[generation.target]).target) as trainer:
        init = trainer.initialize(tiny_models.causal_lm, lr=1e-2, schedule="linear",
                                  warmup_steps=1, total_steps=10, max_grad_norm=1.0)  # fmt: skip
        assert init.model.architecture == "LlamaForCausalLM"
        first = trainer.forward_backward(sft, losses.CrossEntropy())
        step = trainer.optim_step()
        assert step.step == 1 and step.learning_rate == pytest.approx(1e-2 / 2)  # warmup
        for _ in range(3):
            trainer.forward_backward(sft, losses.CrossEntropy())
            trainer.optim_step()
        assert trainer.forward_backward(sft, losses.CrossEntropy()).loss < first.loss
        trainer.optim_step()

        with ReferenceClient(serve("reference").target) as reference:
            ref = [float(lp.sum()) for lp in reference.logprobs(ROWS, [2, 2])]
        pairs = TrainBatch(ROWS, [2, 2], sequence_inputs={"ref_logps": np.array(ref)})
        dpo = trainer.forward_backward(pairs, losses.DPO(beta=0.1))
        assert set(dpo.metrics) >= {"accuracy", "margin", "rewards_chosen", "rewards_rejected"}
        trainer.optim_step()

        outputs = trainer.forward(sft, ["logprobs", "entropy"])
        assert [len(r) for r in outputs["logprobs"]] == [4, 3]
        saved = trainer.save_checkpoint(tmp_path / "ckpt")
        assert saved.step == trainer.state().step
        assert trainer.load_checkpoint(tmp_path / "ckpt").step == saved.step
        (result,) = trainer.push_weights([generation.target], version=1)
        assert result.ok, result.error
        with pytest.raises(InvalidArgumentError, match="loss: bradley_terry needs"):
            trainer.forward_backward(sft, losses.BradleyTerry())
        with pytest.raises(TypeError, match="unknown initialize options"):
            trainer.initialize(tiny_models.causal_lm, learning_rate=1.0)
    with GenerationClient(generation.target) as client:
        assert client.info().weights_version == 1


def test_reward_model_through_the_sdk(serve, tiny_models):
    with TrainerClient(serve("trainer").target) as trainer:
        trainer.initialize(tiny_models.classifier, "sequence_classifier", lr=1e-3)
        pairs = TrainBatch(ROWS, [0, 0])
        before = trainer.forward(pairs, ["rewards"])["rewards"]
        for _ in range(5):
            trainer.forward_backward(pairs, losses.BradleyTerry())
            trainer.optim_step()
        after = trainer.forward(pairs, ["rewards"])["rewards"]
    assert after[0] - after[1] > before[0] - before[1]  # chosen pulled above rejected
