"""What a careless or hostile caller can do to the trainer: each test reproduces a way to leak
credentials, touch files outside the storage root or destroy the model, and checks that the
answer is a clear error and that nothing is lost."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from test_trainer_service import FB, SFT, batch, initialize, logprobs_of, train_steps

from alignd import GenerationClient, TrainerClient
from alignd.errors import FailedPreconditionError, InvalidArgumentError
from alignd.tensors import from_numpy, from_ragged
from alignd.v1 import common_pb2, trainer_pb2

OPTIM = trainer_pb2.OptimStepRequest()


@pytest.fixture
def listener():
    """A TCP listener on loopback that records who connects to it (a would-be token thief)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def connections(sock: socket.socket) -> int:
    """Connections waiting in the listener's queue (nobody accepts them)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def push(trainer, address: str, version: int = 1, **fields):
    request = trainer_pb2.PushWeightsRequest(
        targets=[trainer_pb2.PushTarget(address=address)], version=version, **fields
    )
    return trainer._call("PushWeights", request)


def test_push_weights_never_contacts_a_target_that_is_not_allowed(
    serve, tiny_models, tmp_path, listener, dtype
):
    token = tmp_path / "push-token"
    token.write_text("s3cret-push-token\n")
    generation = serve("generation", auth_token_file=str(token))
    host, port = listener.getsockname()
    trainer_server = serve("trainer", push_targets=[generation.target], push_token_file=str(token))
    with TrainerClient(trainer_server.target) as trainer:
        initialize(trainer, tiny_models.causal_lm, dtype=dtype)
        for address, why in [
            (f"{host}:{port}", "is not an allowed push target"),
            (f"localhost:{port}", "is not an allowed push target"),
            ("dns:///evil.example:443", "must be HOST:PORT"),
            (f"{host}", "must be HOST:PORT"),
        ]:
            with pytest.raises(InvalidArgumentError, match=rf"targets\[0\]\.address: .*{why}"):
                push(trainer, address)
        assert connections(listener) == 0  # the credential went nowhere
        # The allowed (authenticated) replica takes the push: the trainer's asyncio client
        # sends the token on the UpdateWeights stream.
        (result,) = push(trainer, generation.target).results
        assert result.ok, result.error
    with GenerationClient(generation.target, token="s3cret-push-token") as client:
        assert client.info().weights_version == 1


def test_a_listed_dns_name_allows_the_addresses_it_resolves_to(serve, tiny_models, dtype):
    generation = serve("generation")
    port = generation.target.rsplit(":", 1)[1]
    trainer_server = serve("trainer", push_targets=[f"localhost:{port}"])
    with TrainerClient(trainer_server.target) as trainer:
        initialize(trainer, tiny_models.causal_lm, dtype=dtype)
        (result,) = push(trainer, f"127.0.0.1:{port}").results  # what localhost resolves to
        assert result.ok, result.error
        with pytest.raises(InvalidArgumentError, match="not an allowed push target"):
            push(trainer, "127.0.0.1:1", version=2)  # same address, another port


def test_push_targets_are_checked_when_the_trainer_starts():
    from pydantic import ValidationError

    from alignd_server.trainer.config import TrainerSettings

    for entry in ["no-port", "host:0", "unix:/tmp/sock", "::1:50051"]:
        with pytest.raises(ValidationError, match="push_targets"):
            TrainerSettings(push_targets=[entry])
    assert TrainerSettings(push_targets=["[::1]:50051"]).push_targets == ["[::1]:50051"]


@pytest.fixture
def trainer(serve, tiny_models, storage_root, dtype):
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.causal_lm, dtype=dtype)
        yield client


def save(trainer, path) -> trainer_pb2.SaveCheckpointResponse:
    return trainer._call("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=str(path)))


def load(trainer, path, **fields) -> trainer_pb2.LoadCheckpointResponse:
    request = trainer_pb2.LoadCheckpointRequest(path=str(path), **fields)
    return trainer._call("LoadCheckpoint", request)


def test_paths_from_requests_stay_inside_the_storage_root(trainer, tmp_path, storage_root):
    outside = tmp_path.parent.parent  # above the session's temporary directory
    (tmp_path / "out").symlink_to(outside)
    escapes = [
        str(outside / "ckpt"),
        str(tmp_path / ".." / ".." / ".." / "ckpt"),
        str(tmp_path / "out" / "ckpt"),
    ]
    for path in escapes:
        with pytest.raises(InvalidArgumentError, match=r"path: .* leads outside the storage"):
            save(trainer, path)
        with pytest.raises(InvalidArgumentError, match=r"path: .* leads outside the storage"):
            load(trainer, path)
        with pytest.raises(InvalidArgumentError, match=r"model_path: .* leads outside"):
            trainer._call("Initialize", trainer_pb2.InitializeRequest(
                model_path=path, kind=trainer_pb2.MODEL_KIND_CAUSAL_LM))  # fmt: skip
        with pytest.raises(InvalidArgumentError, match=r"shared_path: .* leads outside"):
            push(trainer, "127.0.0.1:1", shared_path=path)
    assert not (outside / "ckpt").exists()
    # Relative paths resolve inside the root, not in the server's working directory.
    relative = tmp_path.relative_to(storage_root) / "relative"
    save(trainer, relative)
    assert (tmp_path / "relative" / "alignd_checkpoint.json").is_file()


def test_save_checkpoint_only_replaces_an_alignd_checkpoint(trainer, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="is not an alignd checkpoint"):
        save(trainer, precious)
    assert (precious / "data.txt").read_text() == "keep me"
    afile = tmp_path / "a-file"
    afile.write_text("keep me too")
    with pytest.raises(InvalidArgumentError, match="is not an alignd checkpoint"):
        save(trainer, afile)
    assert afile.read_text() == "keep me too"
    with pytest.raises(InvalidArgumentError, match=r"parent directory .* does not exist"):
        save(trainer, tmp_path / "missing" / "ckpt")
    save(trainer, tmp_path / "ckpt")
    train_steps(trainer, 1)
    assert save(trainer, tmp_path / "ckpt").step == 1  # a checkpoint is replaced
    assert json.loads((tmp_path / "ckpt" / "alignd_checkpoint.json").read_text())["step"] == 1


def test_shared_path_under_a_regular_file_is_an_invalid_argument(
    serve, tiny_models, tmp_path, dtype
):
    (tmp_path / "file").write_text("x")
    with TrainerClient(serve("trainer", push_targets=["127.0.0.1:1"]).target) as trainer:
        initialize(trainer, tiny_models.causal_lm, dtype=dtype)
        with pytest.raises(InvalidArgumentError, match="shared_path: cannot make"):
            push(trainer, "127.0.0.1:1", shared_path=str(tmp_path / "file" / "weights"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timeout_seconds": float("inf")}, r"timeout_seconds: must be in \(0, 86400\]"),
        ({"timeout_seconds": 1e308}, r"timeout_seconds: must be in \(0, 86400\]"),
        ({"version": 2**63 - 1}, r"version: 9223372036854775807 is outside \[1, "),
        ({"version": -1}, r"version: -1 is outside \[1, "),
        ({"rendezvous": "nohost"}, r"rendezvous: 'nohost' must be HOST:PORT"),
        ({"rendezvous": "127.0.0.1:70000"}, r"rendezvous: .* port in 0..65535"),
        ({"rendezvous": "127.0.0.1:0", "shared_path": "w"}, "rendezvous: choose one transport"),
        ({"bucket_bytes": 4096}, "bucket_bytes: applies to the collective transport only"),
        ({"rendezvous": "127.0.0.1:0", "bucket_bytes": 10}, r"bucket_bytes: must be in \[1024"),
        (
            {"rendezvous": "127.0.0.1:0", "timeout_seconds": 7200},
            r"timeout_seconds: must be in \(0, 3600\]",
        ),
    ],
)
def test_push_weights_bounds_its_deadline_and_version(trainer, fields, message):
    request = trainer_pb2.PushWeightsRequest(
        targets=[trainer_pb2.PushTarget(address="127.0.0.1:1")], **{"version": 1, **fields}
    )
    with pytest.raises(InvalidArgumentError, match=message):
        trainer._call("PushWeights", request)


def pg_loss(**fields) -> trainer_pb2.Loss:
    return trainer_pb2.Loss(policy_gradient=trainer_pb2.PolicyGradientLoss(**fields))


def advantages(value: float) -> dict:
    rows = [np.full(4, value, np.float32), np.full(3, value, np.float32)]
    return {"token_inputs": {"advantages": from_ragged(rows, common_pb2.DTYPE_FLOAT32)}}


@pytest.mark.parametrize(
    ("loss", "scale", "message"),
    [
        (SFT, 1e20, r"loss_scale: must be in \(0, 65536\], got 1e\+20"),
        (SFT, float("nan"), r"loss_scale: must be in \(0, 65536\]"),
        (trainer_pb2.Loss(ppo=trainer_pb2.PpoLoss(clip_range=-0.2)),
         1.0, r"loss\.ppo\.clip_range: must be in \(0, 10\], got -0\.2"),
        (trainer_pb2.Loss(ppo=trainer_pb2.PpoLoss(vf_coef=-1.0)),
         1.0, r"loss\.ppo\.vf_coef: must be in \[0, 1000\], got -1\.0"),
        (trainer_pb2.Loss(ppo=trainer_pb2.PpoLoss(entropy_coef=-1.0)),
         1.0, r"loss\.ppo\.entropy_coef: must be in \[0, 1000\]"),
        (trainer_pb2.Loss(ppo=trainer_pb2.PpoLoss(temperature=1e-30)),
         1.0, r"loss\.ppo\.temperature: must be in \[0\.01, 100\]"),
        (pg_loss(clip_range=-1.0), 1.0, r"loss\.policy_gradient\.clip_range: must be in \(0, 10\]"),
        (pg_loss(kl_coef=float("inf")), 1.0, r"loss\.policy_gradient\.kl_coef: must be in"),
        (trainer_pb2.Loss(ppo=trainer_pb2.PpoLoss(is_cap=0.5)),
         1.0, r"loss\.ppo\.is_cap: must be in \[1, 1000\], got 0\.5"),
        (pg_loss(is_cap=float("nan")), 1.0,
         r"loss\.policy_gradient\.is_cap: must be in \[1, 1000\]"),
        (trainer_pb2.Loss(bradley_terry=trainer_pb2.BradleyTerryLoss(
            center_rewards_coefficient=-0.01)), 1.0,
         r"loss\.bradley_terry\.center_rewards_coefficient: must be in \[0, 1000\]"),
        (trainer_pb2.Loss(dpo=trainer_pb2.DpoLoss(variant=7)), 1.0,
         r"loss\.dpo\.variant: unknown value 7"),
        (trainer_pb2.Loss(dpo=trainer_pb2.DpoLoss(beta=1e300)), 1.0,
         r"loss\.dpo\.beta: must be in \(0, 1000\], got 1e\+300"),
        (trainer_pb2.Loss(kto=trainer_pb2.KtoLoss(desirable_weight=0.0)), 1.0,
         r"loss\.kto\.desirable_weight: must be in \(0, 1000\]"),
    ],
)  # fmt: skip
def test_loss_parameters_out_of_range_are_refused(trainer, loss, scale, message):
    before = logprobs_of(trainer)
    with pytest.raises(InvalidArgumentError, match=message):
        trainer._call("ForwardBackward", FB(batch=batch(), loss=loss, loss_scale=scale))
    assert trainer.state().accumulated_batches == 0
    for got, want in zip(logprobs_of(trainer), before, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ({"lr": 1e308}, r"optimizer\.lr: must be in \(0, 1\], got 1e\+308"),
        ({"eps": 0.0}, r"optimizer\.eps: must be in \(0, 1\]"),
        ({"beta2": float("nan")}, r"optimizer\.beta2: must be in \[0, 1\)"),
        ({"weight_decay": 1e30}, r"optimizer\.weight_decay: must be in \[0, 10\]"),
    ],
)
def test_optimizer_settings_that_would_destroy_the_model_are_refused(
    trainer, tiny_models, optimizer, message
):
    request = trainer_pb2.InitializeRequest(
        model_path=str(tiny_models.causal_lm), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM,
        optimizer=trainer_pb2.AdamWConfig(**optimizer),
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match=message):
        trainer._call("Initialize", request)
    with pytest.raises(InvalidArgumentError, match=r"max_grad_norm: must be in \[0, "):
        trainer._call("Initialize", trainer_pb2.InitializeRequest(
            model_path=str(tiny_models.causal_lm), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM,
            max_grad_norm=float("inf")))  # fmt: skip


def test_a_non_finite_gradient_skips_the_step_and_keeps_the_weights(trainer):
    before = logprobs_of(trainer)
    # Advantages of 1e37 give a finite loss whose gradient norm overflows float32.
    huge = FB(batch=batch(**advantages(1e37)), loss=pg_loss())
    trainer._call("ForwardBackward", huge)
    with pytest.raises(FailedPreconditionError, match=r"gradient norm is (inf|nan).*skipped"):
        trainer._call("OptimStep", OPTIM)
    state = trainer.state()
    assert state.step == 0 and state.accumulated_batches == 0
    for got, want in zip(logprobs_of(trainer), before, strict=True):
        np.testing.assert_array_equal(got, want)
    train_steps(trainer, 1)  # the next healthy step trains normally
    assert trainer.state().step == 1
    assert all(np.isfinite(row).all() for row in logprobs_of(trainer))


def test_a_failed_initialize_keeps_the_model_that_was_loaded(trainer, tmp_path):
    before = logprobs_of(trainer)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    for path in (broken, tmp_path / "missing"):
        with pytest.raises(InvalidArgumentError, match="model_path"):
            trainer._call("Initialize", trainer_pb2.InitializeRequest(
                model_path=str(path), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM))  # fmt: skip
    assert trainer.state().initialized
    for got, want in zip(logprobs_of(trainer), before, strict=True):
        np.testing.assert_array_equal(got, want)


def damage(checkpoint, how: str) -> None:
    if how == "corrupt weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "wrong shapes":
        weights = load_file(str(checkpoint / "model.safetensors"))
        name = next(iter(weights))
        weights[name] = weights[name].flatten()[:-1].clone()
        save_file(weights, str(checkpoint / "model.safetensors"))
    elif how == "non-finite weights":
        weights = load_file(str(checkpoint / "model.safetensors"))
        name = next(iter(weights))
        weights[name] = weights[name].clone().fill_(float("nan"))
        save_file(weights, str(checkpoint / "model.safetensors"))
    elif how == "malformed state json":
        (checkpoint / "trainer_state.json").write_text('{"step": "three"')
    elif how == "state json of another shape":
        meta = json.loads((checkpoint / "trainer_state.json").read_text())
        meta["scheduler"] = {"last_epoch": "x"}
        (checkpoint / "trainer_state.json").write_text(json.dumps(meta))
    elif how == "moments of another shape":
        state = load_file(str(checkpoint / "trainer_state.safetensors"))
        key = next(k for k in state if k.endswith("exp_avg"))
        state[key] = state[key].flatten()[:1].clone()
        save_file(state, str(checkpoint / "trainer_state.safetensors"))


@pytest.mark.parametrize(
    "how",
    ["corrupt weights", "wrong shapes", "non-finite weights", "malformed state json",
     "state json of another shape", "moments of another shape"],
)  # fmt: skip
def test_a_damaged_checkpoint_changes_nothing(trainer, tmp_path, how):
    train_steps(trainer, 1)
    save(trainer, tmp_path / "ckpt")
    train_steps(trainer, 1)  # the live state moves on from the checkpoint
    before, step = logprobs_of(trainer), trainer.state().step
    damage(tmp_path / "ckpt", how)
    with pytest.raises(InvalidArgumentError, match=r"path|load_optimizer"):
        load(trainer, tmp_path / "ckpt")
    assert trainer.state().step == step == 2
    for got, want in zip(logprobs_of(trainer), before, strict=True):
        np.testing.assert_array_equal(got, want)
    train_steps(trainer, 1)  # optimizer and schedule still work
    assert trainer.state().step == 3


def test_zero_element_tensors_with_huge_dimensions_are_invalid_arguments(trainer):
    huge = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[0, 2**63 - 1])
    ids = common_pb2.RaggedTensor(
        values=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT32, shape=[0, 2**63 - 1])
    )
    requests = [
        FB(batch=trainer_pb2.Batch(input_ids=ids, prompt_lengths=[1]), loss=SFT),
        FB(batch=batch(sequence_inputs={"ref_logps": huge}), loss=SFT),
        FB(
            batch=batch(token_inputs={"advantages": common_pb2.RaggedTensor(values=huge)}),
            loss=pg_loss(),
        ),
    ]
    for request in requests:
        with pytest.raises(InvalidArgumentError, match="larger than any array can be"):
            trainer._call("ForwardBackward", request)


def test_a_tiny_temperature_is_refused_not_answered_with_nan(trainer):
    request = trainer_pb2.ForwardRequest(
        batch=batch(), outputs=[trainer_pb2.FORWARD_OUTPUT_LOGPROBS], temperature=1e-30
    )
    with pytest.raises(InvalidArgumentError, match=r"temperature: must be in \[0\.01, 100\]"):
        trainer._call("Forward", request)


def test_non_finite_values_beyond_float32_are_refused(trainer):
    big = np.full(2, 1e39)  # finite in float64, infinite in float32
    request = FB(batch=batch(sequence_inputs={"ref_logps": from_numpy(big)}),
                 loss=trainer_pb2.Loss(dpo=trainer_pb2.DpoLoss()))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="must be a finite"):
        trainer._call("ForwardBackward", request)
    rows = [np.full(4, 1e39), np.full(3, 1e39)]
    tokens = {"advantages": from_ragged(rows, common_pb2.DTYPE_FLOAT64)}
    request = FB(batch=batch(token_inputs=tokens), loss=pg_loss())
    with pytest.raises(InvalidArgumentError, match="must be finite in float32"):
        trainer._call("ForwardBackward", request)


def test_a_checkpoint_symlinked_out_of_the_root_is_not_read(trainer, tmp_path):
    outside = tmp_path.parent.parent / f"outside-{os.getpid()}"
    save(trainer, tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(outside)
    try:
        (tmp_path / "link").symlink_to(outside)
        with pytest.raises(InvalidArgumentError, match="leads outside the storage roots"):
            load(trainer, tmp_path / "link")
    finally:
        import shutil

        shutil.rmtree(outside, ignore_errors=True)
