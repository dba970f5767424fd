"""Training at scale: sharding rules, 2 ranks (torchrun, gloo) compute what 1 rank does, and
packed (padding-free) batches compute what padded ones do."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignd import TrainBatch, TrainerClient, losses
from alignd.clients.trainer import LoraConfig
from alignd.errors import InvalidArgumentError
from alignd.local import LocalService, free_port
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


def test_a_group_of_one_rank_sums_and_gathers_what_it_holds(device, monkeypatch):
    """One rank joins a real group (NCCL with ``--device cuda``, gloo on CPU): sums, maxima
    and gathers over the ranks give back exactly its own values."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        "RANK": "0", "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    group = Group(TrainerSettings(device=device), RankEnvironment(rank=0, world_size=1))
    assert group.backend == ("nccl" if device.startswith("cuda") else "gloo")
    group.join()
    try:
        assert group.sum([1.5, -2.0, 0.25]) == [1.5, -2.0, 0.25]
        assert group.max([1.5, float("-inf")]) == [1.5, float("-inf")]
        assert group.gather(7.0) == [7.0]
        group.agree(None)  # no rank failed: nothing raised
    finally:
        group.close()


def test_fsdp_needs_more_than_one_rank():
    with pytest.raises(ValueError, match="parallel: fsdp shards over several ranks"):
        TrainerSettings(parallel="fsdp")
    assert TrainerSettings(parallel="fsdp", nproc=2).parallel == "fsdp"
    assert TrainerSettings(parallel="fsdp", nnodes=2).parallel == "fsdp"


def _steps(trainer: TrainerClient, steps, record: dict) -> None:
    for batch, loss in steps:
        result = trainer.forward_backward(batch, loss)
        record.setdefault("loss", []).append(result.loss)
        record.setdefault("metrics", []).append(dict(result.metrics))
        record.setdefault("norm", []).append(trainer.optim_step().grad_norm)
        record["num_tokens"] = result.num_tokens


SFT = TrainBatch(ROWS[:5], [2, 1, 3, 2, 4])  # 5 rows: shards of 3 and 2, unequal tokens
COMPLETIONS = [len(r) - p for r, p in zip(ROWS[:5], [2, 1, 3, 2, 4], strict=True)]


def _run(trainer: TrainerClient, model, directory, **options) -> dict:
    """The same fixed steps on any trainer; what they return is compared across world sizes
    and modes: a causal LM (SFT, DPO, the policy gradient with importance weights), a PPO
    policy with a value head, and LoRA. ``options`` go to every Initialize."""
    ref = np.array([-20.0, -15.0, -22.0, -18.0, -25.0, -9.0])
    pairs = TrainBatch(ROWS, [1] * 6, sequence_inputs={"ref_logps": ref})
    # Importance weights of 1 but on the last row's first token (e^0.5; shard 2 of 2): its
    # ``is_weight/max`` is the maximum over the ranks, not their mean.
    old = [np.full(n, -2.0, np.float32) for n in COMPLETIONS]
    behaviour = [o.copy() for o in old]
    behaviour[4][0] = -2.5
    weighted = TrainBatch(ROWS[:5], [2, 1, 3, 2, 4], token_inputs={
        "advantages": [np.full(n, 0.5, np.float32) for n in COMPLETIONS],
        "old_logprobs": old, "behaviour_logprobs": behaviour,
    })  # fmt: skip
    trainer.initialize(model, lr=1e-2, max_grad_norm=0.5, seed=7, **options)
    record: dict = {}
    _steps(trainer, ((SFT, losses.CrossEntropy()), (pairs, losses.DPO(beta=0.2)),
                     (weighted, losses.PolicyGradient(clip_range=0.2))), record)  # fmt: skip
    # Two micro-batches in one step, the first with its reduction deferred.
    trainer.forward_backward(TrainBatch(ROWS[:2], [2, 1]), losses.CrossEntropy(),
                             loss_scale=0.5, defer_sync=True)  # fmt: skip
    trainer.forward_backward(TrainBatch(ROWS[2:5], [3, 2, 4]), losses.CrossEntropy(),
                             loss_scale=0.5)  # fmt: skip
    record["norm"].append(trainer.optim_step().grad_norm)
    # Three micro-batches, none deferred, then one deferred between two that are not: what
    # an earlier micro-batch already reduced is not reduced again.
    for rows, prompts, defer in (((0, 2), [2, 1], False), ((2, 4), [3, 2], False),
                                 ((4, 5), [4], False), ((0, 2), [2, 1], False),
                                 ((2, 4), [3, 2], True), ((4, 5), [4], False)):  # fmt: skip
        trainer.forward_backward(TrainBatch(ROWS[slice(*rows)], prompts), losses.CrossEntropy(),
                                 loss_scale=1 / 3, defer_sync=defer)  # fmt: skip
        if rows[1] == 5:
            record["norm"].append(trainer.optim_step().grad_norm)
    record["logprobs"] = trainer.forward(SFT, ["logprobs", "entropy"])
    record["info"] = trainer.info()
    trainer.save_checkpoint(directory / "lm")
    record["weights"] = load_file(str(directory / "lm" / "model.safetensors"))
    _steps(trainer, ((SFT, losses.CrossEntropy()),), record.setdefault("after", {}))

    values = TrainBatch(ROWS[:5], [2, 1, 3, 2, 4], token_inputs={
        "old_logprobs": old, "advantages": [np.linspace(-1, 1, n, dtype=np.float32)
                                            for n in COMPLETIONS],
        "returns": [np.full(n, 0.3, np.float32) for n in COMPLETIONS],
        "old_values": [np.full(n, 0.1, np.float32) for n in COMPLETIONS],
    })  # fmt: skip
    trainer.initialize(model, "causal_lm_value", lr=1e-2, seed=3, **options)
    _steps(trainer, ((values, losses.PPO()), (values, losses.PPO())), record.setdefault("ppo", {}))
    record["ppo"]["values"] = trainer.forward(values, ["values"])["values"]
    trainer.save_checkpoint(directory / "ppo")
    record["ppo"]["head"] = load_file(str(directory / "ppo" / "value_head.safetensors"))

    trainer.initialize(model, lr=1e-2, seed=5, lora=LoraConfig(r=2), max_grad_norm=1.0,
                       **options)  # fmt: skip
    _steps(trainer, ((SFT, losses.CrossEntropy()), (pairs, losses.DPO())),
           record.setdefault("lora", {}))  # fmt: skip
    trainer.save_checkpoint(directory / "lora")
    record["lora"]["weights"] = load_file(str(directory / "lora" / "model.safetensors"))
    return record


@contextlib.contextmanager
def _trainer(
    tmp_path, storage_root, model, nproc: int, parallel: str = "ddp", *extra: str
) -> Iterator[LocalService]:
    """A trainer of ``nproc`` ranks; once stopped, none of its processes may be left (a rank
    that hung on its way out would outlive torchrun)."""
    import psutil  # comes with accelerate (the serve extra)

    args = ["--model", model, "--nproc", str(nproc), "--master-port", str(free_port()),
            "--metrics-port", "-1", "--storage-root", str(storage_root), "--parallel", parallel,
            *extra]  # fmt: skip
    with LocalService("trainer", args, log_file=tmp_path / f"{parallel}{nproc}.log") as service:
        processes = psutil.Process(service.process.pid).children(recursive=True)
        yield service
    _, alive = psutil.wait_procs(processes, timeout=60)
    for process in alive:
        process.kill()
    assert not alive, f"rank processes outlived the trainer: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def one_rank(tiny_models, tmp_path_factory, storage_root) -> dict:
    model, directory = str(tiny_models.causal_lm), tmp_path_factory.mktemp("one-rank")
    with _trainer(directory, storage_root, model, 1) as service:
        with TrainerClient(service.target) as trainer:
            return {"record": _run(trainer, model, directory), "directory": directory}


def _assert_same(two: dict, one: dict) -> None:
    np.testing.assert_allclose(two["loss"], one["loss"], atol=1e-5)
    np.testing.assert_allclose(two["norm"], one["norm"], rtol=1e-5)
    for got, want in zip(two["metrics"], one["metrics"], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            if not key.endswith("/max"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    assert two["num_tokens"] == one["num_tokens"]


def _assert_tensors(two: dict, one: dict, atol: float = 1e-5) -> None:
    assert two.keys() == one.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=atol, rtol=0)


def _assert_records(two: dict, one: dict, weights_atol: float = 1e-5) -> None:
    """Two runs of :func:`_run` computed the same: losses, metrics, grad norms, outputs and
    saved weights (to ``weights_atol``)."""
    _assert_same(two, one)
    _assert_same(two["after"], one["after"])
    _assert_same(two["ppo"], one["ppo"])
    _assert_same(two["lora"], one["lora"])
    assert two["metrics"][2]["is_weight/max"] == pytest.approx(math.exp(0.5))
    assert one["metrics"][2]["is_weight/max"] == pytest.approx(math.exp(0.5))
    for name in ("logprobs", "entropy"):
        for got, want in zip(two["logprobs"][name], one["logprobs"][name], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
    for got, want in zip(two["ppo"]["values"], one["ppo"]["values"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    _assert_tensors(two["weights"], one["weights"], weights_atol)
    _assert_tensors(two["ppo"]["head"], one["ppo"]["head"], weights_atol)
    _assert_tensors(two["lora"]["weights"], one["lora"]["weights"], weights_atol)


def test_packed_rows_train_exactly_as_padded_rows(serve, tiny_models, tmp_path):
    """Initialize ``packing``: every row of every batch (SFT, DPO, the weighted policy
    gradient, micro-batches, PPO's values, LoRA) in packed sequences, and the same losses,
    metrics, grad norms, outputs and saved weights as right-padded rows."""
    model, records = str(tiny_models.causal_lm), {}
    for packing in (False, True):
        (directory := tmp_path / ("packed" if packing else "padded")).mkdir()
        with TrainerClient(serve("trainer", dtype="float32").target) as trainer:
            records[packing] = _run(trainer, model, directory, packing=packing)
    _assert_records(records[True], records[False])
    assert records[True]["info"].packing and not records[False]["info"].packing


@pytest.mark.slow
@pytest.mark.parametrize("parallel,packing", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_two_ranks_compute_what_one_rank_does(
    parallel, packing, one_rank, tiny_models, tmp_path, storage_root
):
    """SFT, DPO, the weighted policy gradient, a deferred reduction, PPO's value head and
    LoRA: losses, metrics, grad norms, outputs and saved weights of 2 ranks equal 1 rank's
    (padded; with ``packing`` the two ranks pack their shards); FSDP holds about half the
    parameters and optimizer state per rank."""
    model = str(tiny_models.causal_lm)
    with _trainer(tmp_path, storage_root, model, 2, parallel) as service:
        with TrainerClient(service.target) as trainer:
            two = _run(trainer, model, tmp_path, packing=packing)
    one = one_rank["record"]
    # Sharded and packed against whole and padded: two sources of float rounding, which
    # six AdamW steps at lr 1e-2 carry into the weights (1.2e-5 seen; 1e-5 each alone).
    _assert_records(two, one, 2e-5 if packing else 1e-5)
    info, whole = two["info"], one["info"]
    assert (info.world_size, info.parallel, info.dtype) == (2, parallel, "float32")
    assert (whole.world_size, whole.parallel) == (1, "none")
    params, state = whole.parameter_bytes[0], whole.optimizer_bytes[0]
    if parallel == "ddp":  # a replica per rank
        assert list(info.parameter_bytes) == [params, params]
        assert list(info.optimizer_bytes) == [state, state]
    else:  # shards: each rank about half (dim-0 chunks of odd sizes round up on rank 0)
        assert sum(info.parameter_bytes) == params
        for held, total in ((info.parameter_bytes, params), (info.optimizer_bytes, state)):
            assert all(0.4 * total < b < 0.6 * total for b in held), (list(held), total)


def _resume(trainer: TrainerClient, model, checkpoint) -> dict:
    """Loads ``checkpoint`` into a fresh engine and takes the step the one-rank run took
    after saving it."""
    trainer.initialize(model, lr=1e-2, max_grad_norm=0.5, seed=7)
    step = trainer.load_checkpoint(checkpoint).step
    record: dict = {"step": step}
    _steps(trainer, ((SFT, losses.CrossEntropy()),), record)
    return record


@pytest.mark.slow
def test_sharded_checkpoints_load_at_other_world_sizes_and_resume_exactly(
    one_rank, tiny_models, tmp_path, storage_root
):
    """1 → 2: FSDP loads the one-rank (whole) checkpoint and writes a sharded one; 2 → 2 and
    2 → 1 load that; each continues with exactly the step the one-rank run took. A damaged
    shard, a planted index or one naming files outside the checkpoint is refused and leaves
    the trainer as it was."""
    model, whole = str(tiny_models.causal_lm), one_rank["directory"] / "lm"
    after = one_rank["record"]["after"]
    sharded = tmp_path / "sharded"
    with _trainer(tmp_path, storage_root, model, 2, "fsdp") as service:
        with TrainerClient(service.target) as trainer:
            trainer.initialize(model, lr=1e-2, max_grad_norm=0.5, seed=7)
            assert trainer.load_checkpoint(whole).step == 6  # the steps _run took before saving
            trainer.save_checkpoint(sharded)
            records = [_resume(trainer, model, whole), _resume(trainer, model, sharded)]
    marker = json.loads((sharded / "alignd_checkpoint.json").read_text())
    assert marker["format"] == 2 and (sharded / "state" / ".metadata").is_file()
    assert len(list((sharded / "state").glob("*.distcp"))) == 2  # a file of shards per rank
    with _trainer(tmp_path, storage_root, model, 1) as service:
        with TrainerClient(service.target) as trainer:
            records.append(_resume(trainer, model, sharded))
            before = trainer.forward(SFT, ["logprobs"])["logprobs"]
            damaged = tmp_path / "damaged"
            shutil.copytree(sharded, damaged)
            shard = sorted((damaged / "state").glob("*.distcp"))[0]
            shard.write_bytes(shard.read_bytes()[:100])
            with pytest.raises(InvalidArgumentError, match="path"):
                trainer.load_checkpoint(damaged)
            planted = tmp_path / "planted"
            shutil.copytree(sharded, planted)
            (planted / "state" / ".metadata").write_bytes(
                pickle.dumps(os.system)  # unpickling it would hand over a callable
            )
            with pytest.raises(InvalidArgumentError, match="not part of a DCP index"):
                trainer.load_checkpoint(planted)
            escaping = tmp_path / "escaping"  # a real index whose data files lead outside
            shutil.copytree(sharded, escaping)
            index = escaping / "state" / ".metadata"
            metadata = pickle.loads(index.read_bytes())
            for info in metadata.storage_data.values():
                info.relative_path = "../../outside.distcp"
            index.write_bytes(pickle.dumps(metadata))
            with pytest.raises(InvalidArgumentError, match="is not inside the checkpoint"):
                trainer.load_checkpoint(escaping)
            for got, want in zip(trainer.forward(SFT, ["logprobs"])["logprobs"], before,
                                 strict=True):  # fmt: skip
                np.testing.assert_array_equal(got, want)
    for record in records:
        assert record["step"] == 6
        _assert_same(record, after)


@pytest.mark.slow
def test_fsdp_pushes_the_gathered_weights(serve, one_rank, tiny_models, tmp_path, storage_root):
    """Under FSDP every rank gathers its shards for PushWeights: the replica then serves the
    trained model (its log-probs of what it generates equal the trainer's), and the weights
    equal the one-rank run's. Only rank 0 reads the weights at Initialize (the other ranks
    build the model on the meta device and get their shards from it): a weights file rank 0
    cannot read fails Initialize on every rank, naming ``model_path``, and nothing hangs."""
    from alignd import GenerationClient, SamplingParams

    model, replica = str(tiny_models.causal_lm), serve("generation")
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    (weights,) = damaged.glob("*.safetensors")
    weights.write_bytes(b"\x10" + b"\x00" * 7 + b"{")
    push = ("--push-targets", replica.target)
    with _trainer(tmp_path, storage_root, model, 2, "fsdp", *push) as service:
        with TrainerClient(service.target) as trainer:
            with pytest.raises(InvalidArgumentError, match="model_path: cannot load a model"):
                trainer.initialize(str(damaged))
            trainer.initialize(model, lr=1e-2, max_grad_norm=0.5, seed=7)
            trainer.load_checkpoint(one_rank["directory"] / "lm")
            (result,) = trainer.push_weights([replica.target], version=3, timeout_seconds=60)
            assert result.ok, result.error
            greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
            with GenerationClient(replica.target) as client:
                (completion,) = client.generate([ROWS[0][:2]], greedy)[0]
            sequence = np.concatenate([ROWS[0][:2], completion.token_ids]).astype(np.int32)
            own = trainer.forward(TrainBatch([sequence], [2]), ["logprobs"])["logprobs"][0]
    assert completion.weights_version == 3
    np.testing.assert_allclose(completion.logprobs, own, atol=1e-5)


@pytest.mark.slow
def test_a_kill_during_a_sharded_save_leaves_a_loadable_checkpoint(
    one_rank, tiny_models, tmp_path, storage_root
):
    """Every rank of an FSDP trainer is killed (SIGKILL) while it rewrites a sharded
    checkpoint: what is at the path afterwards is a whole checkpoint (the previous one, or
    the new one if the rename came first), and it resumes exactly."""
    import concurrent.futures

    import psutil  # comes with accelerate (the serve extra)

    from alignd.errors import AligndError

    model, target = str(tiny_models.causal_lm), tmp_path / "ckpt"
    with _trainer(tmp_path, storage_root, model, 2, "fsdp") as service:
        with TrainerClient(service.target) as trainer:
            trainer.initialize(model, lr=1e-2, max_grad_norm=0.5, seed=7)
            trainer.load_checkpoint(one_rank["directory"] / "lm")
            trainer.save_checkpoint(target)  # step 6
            _steps(trainer, ((SFT, losses.CrossEntropy()),), {})  # step 7
            processes = [psutil.Process(service.process.pid)]
            processes += processes[0].children(recursive=True)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                saving = pool.submit(trainer.save_checkpoint, target)
                for _ in range(3000):  # until the save is under way (or already done)
                    if saving.done() or any(tmp_path.glob(".ckpt.partial-*")):
                        break
                    time.sleep(0.01)
                for process in reversed(processes):  # the ranks first, then torchrun
                    process.kill()
                with contextlib.suppress(AligndError):  # killed before it answered
                    saving.result(timeout=60)
    with _trainer(tmp_path, storage_root, model, 1) as service:
        with TrainerClient(service.target) as trainer:
            record = _resume(trainer, model, target)
    assert record["step"] in (6, 7)
    if record["step"] == 6:
        _assert_same(record, one_rank["record"]["after"])
