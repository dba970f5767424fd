"""Faults with real processes: services killed and restarted under a running job, a trainer
killed mid-job and resumed, and a trainer killed while it writes a checkpoint."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from alignd import Platform, TrainBatch, TrainerClient, losses
from alignd.jobs import PPOConfig, SFTConfig, make_job
from alignd.local import LocalService
from alignd.tasks.sentiment import SCORER, load_task

TASK = load_task()
pytestmark = pytest.mark.slow


def service(role: str, model, tmp_path, port: int | None = None, *extra: str) -> LocalService:
    args = ["--model", str(model), "--metrics-port", "-1", *extra]
    if role in ("generation", "trainer"):  # tiny models and run directories: the session's tmp
        args += ["--storage-root", str(tmp_path.parent)]
    log = tmp_path / f"{role}-{port or 'first'}.log"
    return LocalService(role, args, log_file=log, port=port, stop_timeout=10)


def kill(process: LocalService) -> None:
    process.process.send_signal(signal.SIGKILL)
    process.process.wait(10)


def test_ppo_survives_generation_reward_and_reference_restarts(tiny_models, tmp_path):
    models = {"generation": tiny_models.causal_lm, "reference": tiny_models.causal_lm,
              "reward": tiny_models.classifier, "trainer": tiny_models.causal_lm}  # fmt: skip
    extra = {"reward": ("--scorers", f"oracle={SCORER}")}
    running = {"generation": service("generation", models["generation"], tmp_path)}
    extra["trainer"] = ("--push-targets", running["generation"].target)
    for role in ("reference", "reward", "trainer"):
        running[role] = service(role, models[role], tmp_path, None, *extra.get(role, ()))
    for process in running.values():
        process.start()
    restarted: list[LocalService] = []
    config = PPOConfig(
        run_dir=tmp_path / "ppo", data={"path": TASK.train_prompts, "limit": 20, "held_out": 4},
        rounds=4, batch_size=4, max_length=160, retry_seconds=120,
        rollout={"prompts_per_round": 4, "max_new_tokens": 6, "scorer": "oracle"},
    )  # fmt: skip
    try:
        with Platform(**{r: p.target for r, p in running.items()}) as platform:
            steps = []
            for row in make_job(config, platform, progress=False).run():
                steps.append(row["step"])
                if row["step"] == 1:  # down for ~3 s, then back on the same ports
                    for role in ("generation", "reward", "reference"):
                        kill(running[role])

                    def restart():
                        time.sleep(3)
                        for role in ("generation", "reward", "reference"):
                            again = service(role, models[role], tmp_path, running[role].port,
                                            *extra.get(role, ()))  # fmt: skip
                            again.start()
                            restarted.append(again)

                    threading.Thread(target=restart, daemon=True).start()
            assert steps == [1, 2, 3, 4]
            # The restarted replica got the policy again before it generated.
            assert platform.generation.info().weights_version == 5
    finally:
        for process in [*running.values(), *restarted]:
            process.stop()


def test_trainer_killed_mid_job_resumes_to_the_same_step_count(tiny_models, tmp_path):
    config = SFTConfig(
        run_dir=tmp_path / "sft", data={"path": TASK.sft, "limit": 40, "held_out": 8},
        max_steps=6, save_every=2, batch_size=4, max_length=160, optim={"lr": 1e-3},
    )  # fmt: skip
    first = service("trainer", tiny_models.causal_lm, tmp_path)
    first.start()
    with Platform(trainer=first.target) as platform:
        with pytest.raises(Exception, match=r"UNAVAILABLE"):
            for row in make_job(config, platform, progress=False).run():
                if row["step"] == 3:
                    kill(first)
    state = json.loads((tmp_path / "sft" / "state.json").read_text())
    assert state["step"] == 2
    with service("trainer", tiny_models.causal_lm, tmp_path, first.port) as second:
        with Platform(trainer=second.target) as platform:
            rows = make_job(config, platform, resume=True, progress=False).run_to_end()
    assert [r["step"] for r in rows] == [3, 4, 5, 6]
    lines = (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_a_kill_during_checkpoint_writing_leaves_the_previous_checkpoint(tmp_path):
    """A model big enough that writing it takes a while (~400 MB); the trainer is killed as
    soon as its temporary directory appears, then a new trainer loads the old checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignd_server.common.tiny import build_chat_tokenizer

    model_dir = tmp_path / "model"
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model_dir)
    build_chat_tokenizer().save_pretrained(model_dir)
    path = tmp_path / "ckpt"
    batch = TrainBatch([[5, 6, 7, 8, 9], [10, 11, 12, 13]], [2, 1])
    first = service("trainer", model_dir, tmp_path)
    with first, TrainerClient(first.target, timeout=300) as trainer:
        trainer.initialize(lr=1e-3, seed=1)
        trainer.forward_backward(batch, losses.CrossEntropy())
        trainer.optim_step()
        trainer.save_checkpoint(path, include_optimizer=False)
        saved = load_file(str(path / "model.safetensors"))
        trainer.forward_backward(batch, losses.CrossEntropy())
        trainer.optim_step()
        writer = threading.Thread(target=_save_ignoring_errors, args=(trainer, path))
        writer.start()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".ckpt.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.002)
        assert list(tmp_path.glob(".ckpt.partial-*")), "the save never started"
        kill(first)
        writer.join(30)
    with service("trainer", model_dir, tmp_path, first.port) as second:
        with TrainerClient(second.target, timeout=300) as trainer:
            trainer.initialize(seed=1)
            assert trainer.load_checkpoint(path, load_optimizer=False).step == 0
    reloaded = load_file(str(path / "model.safetensors"))
    for name, tensor in saved.items():
        np.testing.assert_array_equal(reloaded[name].numpy(), tensor.numpy())


def _save_ignoring_errors(trainer: TrainerClient, path) -> None:
    with contextlib.suppress(Exception):  # the trainer dies mid-call: that is the point
        trainer.save_checkpoint(path, include_optimizer=False)
