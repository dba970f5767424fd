"""Data parallelism: sharding rules, and 2 ranks (torchrun, gloo) compute what 1 rank does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignd import TrainBatch, TrainerClient, losses
from alignd.local import LocalService, free_port
from alignd_server.trainer import parallel
from alignd_server.trainer.config import RankEnvironment, TrainerSettings
from alignd_server.trainer.engine import Batch
from alignd_server.trainer.parallel import Group, decode_batch, encode_batch, shard

ROWS = [np.arange(5, 5 + n, dtype=np.int32) for n in (6, 4, 7, 5, 8, 3)]


def test_batches_survive_the_command_channel():
    prompts = [2, 1, 3, 2, 4, 1]
    completions = [len(r) - p for r, p in zip(ROWS, prompts, strict=True)]
    batch = Batch(
        rows=ROWS, prompts=np.array(prompts),
        completion_mask=[np.ones(n, np.float32) for n in completions],
        token_inputs={"advantages": [np.full(n, 0.5, np.float32) for n in completions]},
        sequence_inputs={"ref_logps": np.arange(6, dtype=np.float32)},
    )  # fmt: skip
    back = decode_batch(encode_batch(batch))
    assert [r.tolist() for r in back.rows] == [r.tolist() for r in ROWS]
    assert back.prompts.tolist() == [2, 1, 3, 2, 4, 1]
    assert [len(m) for m in back.completion_mask] == [4, 3, 4, 3, 4, 2]
    assert back.token_inputs["advantages"][4].tolist() == [0.5] * 4
    assert back.sequence_inputs["ref_logps"].tolist() == list(range(6))


def test_pairwise_shards_keep_each_chosen_row_with_its_rejected_row():
    # 3 pairs: chosen rows 0, 1, 2; rejected rows 3, 4, 5; margins are per pair.
    inputs = {"ref_logps": np.arange(6.0), "margins": np.array([7.0, 8, 9])}
    batch = Batch(rows=ROWS, prompts=np.zeros(6, np.int64), sequence_inputs=inputs)
    first, second = shard(batch, "dpo", 0, 2), shard(batch, "dpo", 1, 2)
    assert first.sequence_inputs["ref_logps"].tolist() == [0, 1, 3, 4]
    assert first.sequence_inputs["margins"].tolist() == [7, 8]
    assert second.sequence_inputs["ref_logps"].tolist() == [2, 5]
    assert [len(r) for r in second.rows] == [7, 3]
    assert shard(batch, "dpo", 3, 4) is None  # 3 pairs over 4 ranks: the last has none


def test_kto_kl_rows_go_to_every_rank():
    kl = np.array([0, 0, 1, 0, 1, 0], np.float32)
    batch = Batch(rows=ROWS, prompts=np.ones(6, np.int64),
                  sequence_inputs={"kl_rows": kl, "labels": np.arange(6.0)})  # fmt: skip
    parts = [shard(batch, "kto", r, 2) for r in range(2)]
    assert [p.sequence_inputs["labels"].tolist() for p in parts] == [[0, 1, 2, 4], [2, 3, 4, 5]]


def test_a_group_of_one_rank_sums_and_reduces_gradients_to_what_it_holds(device, monkeypatch):
    """One rank joins a real group (NCCL with ``--device cuda``, gloo on CPU): sums over the
    ranks and the bucketed gradient all-reduce give back exactly its own values, and a
    parameter without a gradient gets zeros."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(parallel, "BUCKET", 5)  # buckets of 3 + 1, 8 alone, then 6
    group = Group(TrainerSettings(device=device), RankEnvironment(rank=0, world_size=1))
    assert group.backend == ("nccl" if device.startswith("cuda") else "gloo")
    group.join()
    try:
        torch.manual_seed(0)
        shapes = [(3,), (1,), (2, 4), (6,)]
        params = [torch.nn.Parameter(torch.randn(s, device=group.device)) for s in shapes]
        grads = [torch.randn_like(p) for p in params[:3]]
        for p, g in zip(params[:3], grads, strict=True):
            p.grad = g.clone()
        group.reduce_gradients(params)
        for p, g in zip(params[:3], grads, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        assert torch.equal(params[3].grad, torch.zeros(6, device=group.device))
        assert group.sum([1.5, -2.0, 0.25]) == [1.5, -2.0, 0.25]
        assert group.max([1.5, float("-inf")]) == [1.5, float("-inf")]
        group.agree(None)  # no rank failed: nothing raised
    finally:
        group.close()


def _run(trainer: TrainerClient, model, checkpoint) -> dict:
    """The same fixed steps on any trainer; what they return is compared across world sizes."""
    sft = TrainBatch(ROWS[:5], [2, 1, 3, 2, 4])  # 5 rows: shards of 3 and 2, unequal tokens
    ref = np.array([-20.0, -15.0, -22.0, -18.0, -25.0, -9.0])
    pairs = TrainBatch(ROWS, [1] * 6, sequence_inputs={"ref_logps": ref})
    # Importance weights of 1 but on the last row's first token (e^0.5; shard 2 of 2): its
    # ``is_weight/max`` is the maximum over the ranks, not their mean.
    completions = [len(r) - p for r, p in zip(ROWS[:5], [2, 1, 3, 2, 4], strict=True)]
    old = [np.full(n, -2.0, np.float32) for n in completions]
    behaviour = [o.copy() for o in old]
    behaviour[4][0] = -2.5
    weighted = TrainBatch(ROWS[:5], [2, 1, 3, 2, 4], token_inputs={
        "advantages": [np.full(n, 0.5, np.float32) for n in completions],
        "old_logprobs": old, "behaviour_logprobs": behaviour,
    })  # fmt: skip
    trainer.initialize(model, lr=1e-2, max_grad_norm=0.5, seed=7)
    record = {"loss": [], "metrics": [], "norm": []}
    for batch, loss in ((sft, losses.CrossEntropy()), (pairs, losses.DPO(beta=0.2)),
                        (weighted, losses.PolicyGradient(clip_range=0.2)),
                        (sft, losses.CrossEntropy())):  # fmt: skip
        result = trainer.forward_backward(batch, loss)
        record["loss"].append(result.loss)
        record["metrics"].append(dict(result.metrics))
        record["norm"].append(trainer.optim_step().grad_norm)
    record["num_tokens"] = result.num_tokens
    record["logprobs"] = trainer.forward(sft, ["logprobs", "entropy"])
    trainer.save_checkpoint(checkpoint)
    record["weights"] = load_file(str(checkpoint / "model.safetensors"))
    return record


@pytest.mark.slow
def test_two_ranks_compute_what_one_rank_does(tiny_models, tmp_path, storage_root):
    model = str(tiny_models.causal_lm)
    results = {}
    for nproc in (1, 2):
        args = ["--model", model, "--nproc", str(nproc), "--master-port", str(free_port()),
                "--metrics-port", "-1", "--storage-root", str(storage_root)]  # fmt: skip
        with LocalService("trainer", args, log_file=tmp_path / f"rank{nproc}.log") as service:
            with TrainerClient(service.target) as trainer:
                assert trainer.info().world_size == nproc
                results[nproc] = _run(trainer, model, tmp_path / f"ckpt{nproc}")
    one, two = results[1], results[2]
    np.testing.assert_allclose(two["loss"], one["loss"], atol=1e-5)
    np.testing.assert_allclose(two["norm"], one["norm"], rtol=1e-5)
    for got, want in zip(two["metrics"], one["metrics"], strict=True):
        assert got.keys() == want.keys()
        for key in (
            "accuracy",
            "margin",
            "rewards_chosen",
            "nll",
            "is_weight/mean",
            "is_weight/clipped_fraction",
        ):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-5)
    assert two["metrics"][2]["is_weight/max"] == pytest.approx(math.exp(0.5))
    assert one["metrics"][2]["is_weight/max"] == pytest.approx(math.exp(0.5))
    assert two["num_tokens"] == one["num_tokens"]
    for name in ("logprobs", "entropy"):
        for got, want in zip(two["logprobs"][name], one["logprobs"][name], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert two["weights"].keys() == one["weights"].keys()
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], tensor, atol=1e-5, rtol=0)
