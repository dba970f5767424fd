"""Resume is exact across a real restart of the trainer process (and across world sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from alignd import TrainBatch, TrainerClient, losses
from alignd.local import LocalService, free_port

BATCH = TrainBatch([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19, 20]], [2, 3, 1])
OPTIONS = dict(lr=1e-2, weight_decay=0.01, schedule="cosine", warmup_steps=1, total_steps=4,
               max_grad_norm=1.0, seed=3)  # fmt: skip


def steps(trainer: TrainerClient, count: int) -> None:
    for _ in range(count):
        trainer.forward_backward(BATCH, losses.CrossEntropy())
        trainer.optim_step()


def trainer_process(model, tmp_path, name: str, nproc: int = 1) -> LocalService:
    args = ["--model", str(model), "--nproc", str(nproc), "--master-port", str(free_port()),
            "--metrics-port", "-1", "--storage-root", str(tmp_path)]  # fmt: skip
    return LocalService("trainer", args, log_file=tmp_path / f"{name}.log")


@pytest.mark.slow
@pytest.mark.parametrize("resumed_ranks", [1, 2])
def test_four_steps_equal_two_steps_save_restart_load_two_steps(
    tiny_models, tmp_path, resumed_ranks
):
    with trainer_process(tiny_models.causal_lm, tmp_path, "straight") as service:
        with TrainerClient(service.target) as trainer:
            trainer.initialize(**OPTIONS)
            steps(trainer, 4)
            expected = trainer.forward(BATCH)["logprobs"]
    with trainer_process(tiny_models.causal_lm, tmp_path, "first") as service:
        with TrainerClient(service.target) as trainer:
            trainer.initialize(**OPTIONS)
            steps(trainer, 2)
            trainer.save_checkpoint(tmp_path / "ckpt")
    # The first process is gone; a new one (with as many ranks as asked) picks up the run.
    with trainer_process(tiny_models.causal_lm, tmp_path, "second", resumed_ranks) as service:
        with TrainerClient(service.target) as trainer:
            trainer.initialize(**OPTIONS)
            assert trainer.load_checkpoint(tmp_path / "ckpt").step == 2
            steps(trainer, 2)
            state = trainer.state()
            got = trainer.forward(BATCH)["logprobs"]
    assert state.step == 4
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7 if resumed_ranks == 1 else 1e-5)
