"""TrainerService primitives over a real loopback server (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignd import GenerationClient, ReferenceClient, TrainerClient
from alignd.errors import FailedPreconditionError, InvalidArgumentError
from alignd.tensors import from_numpy, from_ragged, to_ragged
from alignd.v1 import common_pb2, trainer_pb2
from alignd_server.common.models import load_causal_lm

F32, I32 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_INT32
ROWS = [np.array([5, 6, 7, 8, 9, 10], np.int32), np.array([11, 12, 13, 14, 15, 16], np.int32)]
PROMPTS = [2, 3]
SFT = trainer_pb2.Loss(cross_entropy=trainer_pb2.CrossEntropyLoss())
REDUCED_PRECISION_ATOL = {"bfloat16": 5e-2, "float16": 1e-2}
"""Under ``--dtype bfloat16`` or ``float16``: the absolute tolerance of a comparison between
values that reach the dtype's rounding along different paths (a float64 formula, another
service's kernels and batch shapes, merged LoRA weights) — a few rounding steps of the dtype
(8 and 11 significant bits) at the size of the values compared, log-probs and losses of a few
nats. Comparisons of one path with itself (resume, unchanged weights) stay exact."""


def batch(rows=ROWS, prompts=PROMPTS, **fields) -> trainer_pb2.Batch:
    return trainer_pb2.Batch(input_ids=from_ragged(rows, I32), prompt_lengths=prompts, **fields)


def atol(dtype: str, float32: float) -> float:
    """``float32``, the test's own tolerance, under float32; the dtype's otherwise."""
    return float32 if dtype == "float32" else REDUCED_PRECISION_ATOL[dtype]


def initialize(client, path, kind=trainer_pb2.MODEL_KIND_CAUSAL_LM, lr=1e-2, dtype=""):
    optimizer = trainer_pb2.AdamWConfig(lr=lr)
    request = trainer_pb2.InitializeRequest(
        model_path=str(path), kind=kind, dtype=dtype, optimizer=optimizer, seed=1
    )
    return client._call("Initialize", request)


def nll(path, rows, prompts) -> float:
    """Token-mean NLL of the completions under the model, written out."""
    model = load_causal_lm(path).model
    total, count = 0.0, 0
    for row, p in zip(rows, prompts, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor(row[None].tolist())).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        for t in range(p, len(row)):
            total -= float(logprobs[t - 1, row[t]])
            count += 1
    return total / count


def test_primitives_need_initialize_first(serve):
    with TrainerClient(serve("trainer").target) as client:
        assert client.state().initialized is False
        with pytest.raises(FailedPreconditionError, match="Initialize"):
            client._call(
                "ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=batch(), loss=SFT)
            )
        with pytest.raises(FailedPreconditionError):
            client._call("OptimStep", trainer_pb2.OptimStepRequest())


def test_cross_entropy_step_matches_the_formula_and_learns(serve, tiny_models, dtype):
    with TrainerClient(serve("trainer").target) as client:
        response = initialize(client, tiny_models.causal_lm, dtype=dtype)
        assert response.trainable_parameters > 0
        first = client._call(
            "ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=batch(), loss=SFT)
        )
        expected = nll(tiny_models.causal_lm, ROWS, PROMPTS)
        assert first.loss == pytest.approx(expected, abs=atol(dtype, 1e-5))
        assert (first.num_tokens, first.accumulated_batches) == (7, 1)
        step = client._call("OptimStep", trainer_pb2.OptimStepRequest())
        assert (step.step, step.learning_rate) == (1, pytest.approx(1e-2))
        assert step.grad_norm > 0
        for _ in range(5):
            client._call(
                "ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=batch(), loss=SFT)
            )
            client._call("OptimStep", trainer_pb2.OptimStepRequest())
        last = client._call(
            "ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=batch(), loss=SFT)
        )
        assert last.loss < first.loss - 0.5
        state = client.state()
        assert (state.initialized, state.step, state.accumulated_batches) == (True, 6, 1)


def params_after(client, path, requests, dtype) -> dict[str, np.ndarray]:
    initialize(client, path, dtype=dtype)
    for request in requests:
        client._call("ForwardBackward", request)
    client._call("OptimStep", trainer_pb2.OptimStepRequest())
    probe = client._call(
        "Forward",
        trainer_pb2.ForwardRequest(batch=batch(), outputs=[trainer_pb2.FORWARD_OUTPUT_LOGPROBS]),
    )
    return [r.copy() for r in to_ragged(probe.logprobs)]


def test_accumulating_two_halves_equals_one_full_batch(serve, tiny_models, dtype):
    prompts = [2, 2]  # equal token counts: the mean of the half means is the full mean
    full = trainer_pb2.ForwardBackwardRequest(batch=batch(prompts=prompts), loss=SFT)
    halves = [
        trainer_pb2.ForwardBackwardRequest(batch=batch([r], [2]), loss=SFT, loss_scale=0.5)
        for r in ROWS
    ]
    with TrainerClient(serve("trainer").target) as client:
        one = params_after(client, tiny_models.causal_lm, [full], dtype)
        two = params_after(client, tiny_models.causal_lm, halves, dtype)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, atol=atol(dtype, 1e-6))


def test_forward_logprobs_equal_the_reference_service(serve, tiny_models, dtype):
    with TrainerClient(serve("trainer").target) as trainer:
        initialize(trainer, tiny_models.causal_lm, dtype=dtype)
        outputs = [trainer_pb2.FORWARD_OUTPUT_LOGPROBS, trainer_pb2.FORWARD_OUTPUT_ENTROPY]
        got = trainer._call("Forward", trainer_pb2.ForwardRequest(batch=batch(), outputs=outputs))
    with ReferenceClient(serve("reference").target) as reference:
        expected = reference.logprobs(ROWS, PROMPTS)
    for a, b in zip(to_ragged(got.logprobs), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=atol(dtype, 1e-5))
    assert all((e > 0).all() for e in to_ragged(got.entropy))


def test_reward_model_bradley_terry(serve, tiny_models, dtype):
    loss = trainer_pb2.Loss(bradley_terry=trainer_pb2.BradleyTerryLoss())
    pairs = batch([ROWS[0], ROWS[1]], [0, 0])
    with TrainerClient(serve("trainer").target) as client:
        initialize(
            client, tiny_models.classifier, trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER, dtype=dtype
        )
        rewards = client._call(
            "Forward",
            trainer_pb2.ForwardRequest(batch=pairs, outputs=[trainer_pb2.FORWARD_OUTPUT_REWARDS]),
        )
        r = np.frombuffer(rewards.rewards.data, "<f4")
        response = client._call(
            "ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=pairs, loss=loss)
        )
    expected = float(np.log1p(np.exp(-(r[0] - r[1]))))
    assert response.loss == pytest.approx(expected, abs=atol(dtype, 1e-5))
    assert response.metrics["accuracy"] == float(r[0] > r[1])


BT = trainer_pb2.Loss(bradley_terry=trainer_pb2.BradleyTerryLoss())
DPO = trainer_pb2.Loss(dpo=trainer_pb2.DpoLoss())
PG = trainer_pb2.Loss(policy_gradient=trainer_pb2.PolicyGradientLoss())
NAN_ADVANTAGES = {
    "advantages": from_ragged([np.full(4, np.nan, np.float32), np.zeros(3, np.float32)], F32)
}
SHORT_ADVANTAGES = {"advantages": from_ragged([np.zeros(2, np.float32)] * 2, F32)}
MATRIX = {"ref_logps": from_numpy(np.zeros((2, 2), np.float32))}
FB = trainer_pb2.ForwardBackwardRequest


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (FB(batch=batch(), loss=BT), r"loss: bradley_terry needs a sequence_classifier"),
        (FB(batch=batch(), loss=DPO), r"ref_logps"),
        (FB(batch=batch(), loss=trainer_pb2.Loss()), r"loss: one loss"),
        (FB(batch=batch(token_inputs=NAN_ADVANTAGES), loss=PG),
         r'batch\.token_inputs\["advantages"\]: must be finite'),
        (FB(batch=batch(token_inputs=SHORT_ADVANTAGES), loss=PG),
         r"row lengths \[2, 2\] must equal the completion lengths \[4, 3\]"),
        (FB(batch=batch(prompts=[6, 3]), loss=SFT),
         r"batch\.prompt_lengths\[0\]: 6 must be in \[1, 5\]"),
        (FB(batch=batch(sequence_inputs=MATRIX), loss=SFT),
         r'batch\.sequence_inputs\["ref_logps"\]: must be a finite 1-D tensor'),
    ],
)  # fmt: skip
def test_bad_batches_and_losses_are_invalid_arguments(serve, tiny_models, dtype, request_, message):
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.causal_lm, dtype=dtype)
        with pytest.raises(InvalidArgumentError, match=message):
            client._call("ForwardBackward", request_)
        assert client.state().accumulated_batches == 0  # nothing accumulated


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": 0}, "kind: must be"),
        ({"optimizer": trainer_pb2.AdamWConfig(lr=0.0)},
         r"optimizer\.lr: must be in \(0, 1\], got 0\.0"),
        ({"optimizer": trainer_pb2.AdamWConfig(beta1=1.0)},
         r"optimizer\.beta1: must be in \[0, 1\), got 1\.0"),
        ({"schedule": trainer_pb2.ScheduleConfig(kind=trainer_pb2.SCHEDULE_KIND_COSINE,
                                                 warmup_steps=5, total_steps=5)},
         r"schedule\.total_steps: 5 must exceed warmup_steps 5"),
        ({"model_path": "/no/such/model"}, r"model_path: "),
        ({"dtype": "int8"}, r"dtype: 'int8'"),
        ({"packing": trainer_pb2.PackingConfig(max_tokens=1)},
         r"packing\.max_tokens: 1 must be 0 \(chosen per batch\) or 2 \.\. 1048576"),
        ({"packing": trainer_pb2.PackingConfig(max_tokens=(1 << 20) + 1)}, r"packing\.max_tokens"),
    ],
)  # fmt: skip
def test_bad_initialize_requests_are_invalid_arguments(serve, tiny_models, fields, message):
    request = trainer_pb2.InitializeRequest(
        model_path=str(tiny_models.causal_lm), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM
    )
    for key, value in fields.items():
        if isinstance(value, (int, str)):
            setattr(request, key, value)
        else:
            getattr(request, key).CopyFrom(value)
    with TrainerClient(serve("trainer").target) as client:
        with pytest.raises(InvalidArgumentError, match=message):
            client._call("Initialize", request)


def test_models_that_cannot_pack_are_refused_naming_packing(serve, tiny_models, tmp_path):
    """An encoder classifier (it attends both ways), and a model whose packed forward differs
    from its padded one (OPT takes its positions from the attention mask): Initialize fails
    naming ``packing`` and the previous model stays."""
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(
        vocab_size=200, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0,
    )).save_pretrained(tmp_path / "opt")  # fmt: skip
    load_causal_lm(tiny_models.causal_lm).tokenizer.save_pretrained(tmp_path / "opt")
    packing = trainer_pb2.PackingConfig()
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.causal_lm)
        for path, kind, message in (
            (tiny_models.classifier, trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER,
             "BertForSequenceClassification is an encoder classifier"),
            (tmp_path / "opt", trainer_pb2.MODEL_KIND_CAUSAL_LM,
             "OPTForCausalLM gives other logprobs packed than padded"),
        ):  # fmt: skip
            request = trainer_pb2.InitializeRequest(model_path=str(path), kind=kind,
                                                    packing=packing)  # fmt: skip
            with pytest.raises(InvalidArgumentError, match=f"packing: cannot pack .*{message}"):
                client._call("Initialize", request)
        info = client.info()
        assert info.server.model.architecture == "LlamaForCausalLM" and not info.packing


def test_a_decoder_reward_model_trains_packed_as_padded(serve, tiny_models):
    """A causal LM loaded as a one-label classifier scores each row's last token; packed
    rows give the padded rewards, Bradley-Terry losses and grad norms."""
    pairs = batch([ROWS[0], ROWS[1][:4], ROWS[1], ROWS[0][:3]], [0, 0, 0, 0])
    rewards = trainer_pb2.ForwardRequest(batch=pairs, outputs=[trainer_pb2.FORWARD_OUTPUT_REWARDS])
    seen = {}
    for packing in (None, trainer_pb2.PackingConfig(max_tokens=8)):
        with TrainerClient(serve("trainer", dtype="float32").target) as client:
            request = trainer_pb2.InitializeRequest(
                model_path=str(tiny_models.causal_lm), optimizer=trainer_pb2.AdamWConfig(lr=1e-2),
                kind=trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER, seed=1, packing=packing,
            )  # fmt: skip
            client._call("Initialize", request)
            losses, norms = [], []
            for _ in range(2):
                losses.append(client._call(
                    "ForwardBackward", trainer_pb2.ForwardBackwardRequest(batch=pairs, loss=BT)
                ).loss)  # fmt: skip
                norms.append(client._call("OptimStep", trainer_pb2.OptimStepRequest()).grad_norm)
            scores = np.frombuffer(client._call("Forward", rewards).rewards.data, "<f4")
            seen[packing is not None] = (losses, norms, scores)
    for got, want in zip(seen[True], seen[False], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_initialize_without_dtype_takes_the_servers_dtype_setting(serve, tiny_models):
    """The dtype is the compute dtype (mixed precision): the weights stay float32."""
    request = trainer_pb2.InitializeRequest(
        model_path=str(tiny_models.causal_lm), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM
    )
    with TrainerClient(serve("trainer", dtype="bfloat16").target) as client:
        assert client._call("Initialize", request).model.dtype == "float32"
        info = client.info()
        assert (info.dtype, info.parallel, info.world_size) == ("bfloat16", "none", 1)
        assert info.parameter_bytes[0] == 4 * client.state().trainable_parameters
        assert list(info.optimizer_bytes) == [0]
        request.dtype = "float32"  # a request's own dtype wins
        client._call("Initialize", request)
        assert client.info().dtype == "float32"
        train_steps(client, 1)
        info = client.info()  # AdamW: two moments per weight, and a step count per tensor
        assert 8 * client.state().trainable_parameters < info.optimizer_bytes[0]
        assert info.optimizer_bytes[0] < 9 * client.state().trainable_parameters


def test_defer_sync_holds_the_step_until_the_last_micro_batch(serve, tiny_models):
    with TrainerClient(serve("trainer").target) as client:
        client._call(
            "Initialize",
            trainer_pb2.InitializeRequest(
                model_path=str(tiny_models.causal_lm), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM
            ),
        )
        client._call("ForwardBackward", FB(batch=batch(), loss=SFT, defer_sync=True))
        with pytest.raises(FailedPreconditionError, match="defer_sync"):
            client._call("OptimStep", trainer_pb2.OptimStepRequest())
        assert client.state().accumulated_batches == 1  # kept
        client._call("ForwardBackward", FB(batch=batch(), loss=SFT))
        assert client._call("OptimStep", trainer_pb2.OptimStepRequest()).step == 1


def train_steps(client, count: int) -> None:
    for _ in range(count):
        client._call("ForwardBackward", FB(batch=batch(), loss=SFT))
        client._call("OptimStep", trainer_pb2.OptimStepRequest())


def logprobs_of(client) -> list[np.ndarray]:
    outputs = [trainer_pb2.FORWARD_OUTPUT_LOGPROBS]
    response = client._call("Forward", trainer_pb2.ForwardRequest(batch=batch(), outputs=outputs))
    return [r.copy() for r in to_ragged(response.logprobs)]


def test_resume_from_a_checkpoint_is_exact(serve, tiny_models, tmp_path, dtype):
    schedule = trainer_pb2.ScheduleConfig(
        kind=trainer_pb2.SCHEDULE_KIND_COSINE, warmup_steps=1, total_steps=4
    )
    request = trainer_pb2.InitializeRequest(
        model_path=str(tiny_models.causal_lm), kind=trainer_pb2.MODEL_KIND_CAUSAL_LM, dtype=dtype,
        optimizer=trainer_pb2.AdamWConfig(lr=1e-2, weight_decay=0.01), schedule=schedule,
        max_grad_norm=1.0, seed=3,
    )  # fmt: skip
    with TrainerClient(serve("trainer").target) as straight:
        straight._call("Initialize", request)
        train_steps(straight, 4)
        expected = logprobs_of(straight)
    with TrainerClient(serve("trainer").target) as first:
        first._call("Initialize", request)
        train_steps(first, 2)
        saved = first._call(
            "SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=str(tmp_path / "ckpt"))
        )
        assert saved.step == 2 and saved.bytes > 0
    with TrainerClient(serve("trainer").target) as second:  # a new server process state
        second._call("Initialize", request)
        loaded = second._call(
            "LoadCheckpoint", trainer_pb2.LoadCheckpointRequest(path=str(tmp_path / "ckpt"))
        )
        assert loaded.step == 2
        train_steps(second, 2)
        assert second.state().step == 4
        got = logprobs_of(second)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_a_checkpoint_holds_tied_weights_once_whatever_their_names(
    serve, tiny_models, tmp_path, dtype
):
    """BERT as a causal LM ties its decoder weight and bias to tensors named otherwise (not
    lm_head.weight): the checkpoint holds each once, and loads back into the model."""
    path = str(tmp_path / "ckpt")
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.classifier, dtype=dtype)
        train_steps(client, 1)
        client._call("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=path))
        trained = logprobs_of(client)
        initialize(client, tiny_models.classifier, dtype=dtype)
        loaded = client._call("LoadCheckpoint", trainer_pb2.LoadCheckpointRequest(path=path))
        assert loaded.step == 1
        for a, b in zip(logprobs_of(client), trained, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_checkpoint_is_a_model_every_service_loads(serve, tiny_models, tmp_path, dtype):
    path = tmp_path / "ckpt"
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.causal_lm, dtype=dtype)
        train_steps(client, 1)
        client._call("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=str(path)))
        trained = logprobs_of(client)
        client._call(
            "SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=str(path))
        )  # overwrite
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary or old copies left behind
    with ReferenceClient(serve("reference", model=str(path)).target) as reference:
        served = reference.logprobs(ROWS, PROMPTS)
    for a, b in zip(served, trained, strict=True):
        np.testing.assert_allclose(a, b, atol=atol(dtype, 1e-5))
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.causal_lm)
        with pytest.raises(InvalidArgumentError, match="is not a checkpoint directory"):
            client._call(
                "LoadCheckpoint", trainer_pb2.LoadCheckpointRequest(path=str(tmp_path / "none"))
            )


def test_push_weights_to_generation_replicas(serve, tiny_models, tmp_path, dtype):
    from alignd import GenerationClient, SamplingParams
    from alignd.local import free_port

    replicas = [serve("generation"), serve("generation")]
    dead = f"127.0.0.1:{free_port()}"
    targets = [trainer_pb2.PushTarget(address=r.target) for r in replicas]
    allowed = [*(r.target for r in replicas), dead]
    with TrainerClient(serve("trainer", push_targets=allowed).target) as trainer:
        initialize(trainer, tiny_models.causal_lm, dtype=dtype)
        train_steps(trainer, 2)
        trained = logprobs_of(trainer)
        request = trainer_pb2.PushWeightsRequest(
            targets=[*targets, trainer_pb2.PushTarget(address=dead)], version=1, timeout_seconds=20
        )
        results = trainer._call("PushWeights", request).results
        assert [r.ok for r in results] == [True, True, False]
        assert results[2].address == dead and results[2].error.startswith("UNAVAILABLE")
        assert results[0].bytes > 0
        by_path = trainer._call("PushWeights", trainer_pb2.PushWeightsRequest(
            targets=targets[:1], version=2, shared_path=str(tmp_path)))  # fmt: skip
        assert by_path.results[0].ok, by_path.results[0].error
        assert trainer.state().pushed_version == 2
        with pytest.raises(InvalidArgumentError, match=r"targets: 0 targets"):
            trainer._call("PushWeights", trainer_pb2.PushWeightsRequest(version=3))
        # What a replica now serves is what the trainer trained: its log-probs of what it
        # generates equal the trainer's own.
        greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
        with GenerationClient(replicas[1].target) as client:
            assert client.info().weights_version == 1
            (completion,) = client.generate([ROWS[0][:2]], greedy)[0]
        sequence = np.concatenate([ROWS[0][:2], completion.token_ids]).astype(np.int32)
        outputs = [trainer_pb2.FORWARD_OUTPUT_LOGPROBS]
        own = trainer._call(
            "Forward", trainer_pb2.ForwardRequest(batch=batch([sequence], [2]), outputs=outputs)
        )
    assert completion.weights_version == 1
    np.testing.assert_allclose(
        to_ragged(own.logprobs)[0], completion.logprobs, atol=atol(dtype, 1e-5)
    )
    with GenerationClient(replicas[0].target) as client:
        assert client.info().weights_version == 2
    assert trained  # the trainer did train before pushing


@pytest.mark.parametrize(
    ("method", "request_", "message"),
    [
        ("Forward", trainer_pb2.ForwardRequest(batch=batch()), r"outputs: ask for at least one"),
        ("Forward", trainer_pb2.ForwardRequest(batch=batch(), outputs=[99]),
         r"outputs: unknown output"),
        ("Forward", trainer_pb2.ForwardRequest(batch=batch(), outputs=[4]),
         r"outputs: rewards need a sequence_classifier"),
        ("Forward", trainer_pb2.ForwardRequest(batch=batch(), outputs=[1], temperature=0.0),
         r"temperature: must be in \[0\.01, 100\]"),
        ("PushWeights", trainer_pb2.PushWeightsRequest(
            targets=[trainer_pb2.PushTarget(address="127.0.0.1:1")], version=0),
         r"version: 0 is outside \[1, 9007199254740991\]"),
        ("PushWeights", trainer_pb2.PushWeightsRequest(
            targets=[trainer_pb2.PushTarget(address="127.0.0.1:1")], version=1,
            timeout_seconds=-1), r"timeout_seconds: must be in \(0, 86400\], got -1"),
        ("PushWeights", trainer_pb2.PushWeightsRequest(
            targets=[trainer_pb2.PushTarget()], version=1), r"targets\[0\]\.address: must be set"),
        ("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(), r"path: must be set"),
        ("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path="/no/such/dir/ckpt"),
         r"path: '/no/such/dir/ckpt' leads outside the storage roots"),
        ("ForwardBackward", FB(batch=batch(), loss=SFT, loss_scale=0.0),
         r"loss_scale: must be in \(0, 65536\]"),
    ],
)  # fmt: skip
def test_bad_trainer_requests_name_the_field(serve, tiny_models, dtype, method, request_, message):
    with TrainerClient(serve("trainer").target) as client:
        initialize(client, tiny_models.causal_lm, dtype=dtype)
        with pytest.raises(InvalidArgumentError, match=message):
            client._call(method, request_)


def test_trainer_metrics_report_step_loss_lr_and_grad_norm(serve, tiny_models, tmp_path, dtype):
    import urllib.request

    server = serve("trainer")
    with TrainerClient(server.target) as client:
        initialize(client, tiny_models.causal_lm, dtype=dtype)
        loss = client._call("ForwardBackward", FB(batch=batch(), loss=SFT)).loss
        step = client._call("OptimStep", trainer_pb2.OptimStepRequest())
        client._call("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(path=str(tmp_path / "c")))
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    values = {}
    for line in page.splitlines():
        if line.startswith("alignd_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["alignd_trainer_step"] == 1
    assert values['alignd_trainer_loss{loss="cross_entropy"}'] == pytest.approx(loss, rel=1e-6)
    assert values["alignd_trainer_learning_rate"] == pytest.approx(step.learning_rate)
    assert values["alignd_trainer_grad_norm"] == pytest.approx(step.grad_norm, rel=1e-6)
    assert values["alignd_trainer_tokens_total"] == 7
    assert values["alignd_checkpoint_seconds_count"] == 1


def test_bfloat16_trains_in_mixed_precision_on_float32_master_weights(serve, tiny_models, tmp_path):
    """bf16 compute (autocast) follows the float32 run within bf16's precision, while the
    weights and AdamW's moments stay float32: the checkpoint is float32."""
    from safetensors.torch import load_file

    losses = {}
    with TrainerClient(serve("trainer").target) as client:
        for dtype in ("float32", "bfloat16"):
            initialize(client, tiny_models.causal_lm, dtype=dtype)
            losses[dtype] = []
            for _ in range(3):
                losses[dtype].append(
                    client._call("ForwardBackward", FB(batch=batch(), loss=SFT)).loss
                )
                client._call("OptimStep", trainer_pb2.OptimStepRequest())
        client.save_checkpoint(tmp_path / "bf16")
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
    assert losses["bfloat16"] != losses["float32"]  # bf16 did compute something else
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    state = load_file(str(tmp_path / "bf16" / "trainer_state.safetensors"))
    assert {t.dtype for k, t in state.items() if "exp_avg" in k} == {torch.float32}


def test_the_collective_transport_gives_replicas_what_the_stream_gives(serve, tiny_models):
    """PushWeights with a rendezvous: two replicas receive the trained weights over
    torch.distributed groups (small buckets: tensors span buckets), serving exactly what a
    replica pushed over the stream serves; a dead target fails alone, and a refused header
    (a stale version) fails that target at once, the old weights serving on."""
    from alignd import GenerationClient, SamplingParams
    from alignd.local import free_port

    replicas = [serve("generation") for _ in range(3)]
    dead = f"127.0.0.1:{free_port()}"
    with TrainerClient(serve("trainer", push_targets=[*(r.target for r in replicas),
                                                      dead]).target) as trainer:  # fmt: skip
        initialize(trainer, tiny_models.causal_lm)
        train_steps(trainer, 2)
        (streamed,) = trainer.push_weights([replicas[0].target], version=1)
        assert streamed.ok, streamed.error
        results = trainer.push_weights(
            [replicas[1].target, replicas[2].target, dead], version=1, timeout_seconds=60,
            rendezvous="127.0.0.1:0", bucket_bytes=4096,
        )  # fmt: skip
        assert [r.ok for r in results] == [True, True, False], [r.error for r in results]
        assert results[2].error.startswith("UNAVAILABLE")
        assert results[0].bytes == results[1].bytes == streamed.bytes > 4096
        (stale,) = trainer.push_weights([replicas[1].target], version=1, timeout_seconds=60,
                                        rendezvous="127.0.0.1:0")  # fmt: skip
        assert not stale.ok and stale.error.startswith("INVALID_ARGUMENT"), stale.error
        assert "header.version" in stale.error and stale.seconds < 30
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    served = []
    for replica in replicas:
        with GenerationClient(replica.target) as client:
            assert client.info().weights_version == 1
            (completion,) = client.generate([ROWS[0][:2]], greedy)[0]
            served.append((completion.token_ids, completion.logprobs))
    for token_ids, logprobs in served[1:]:  # bit for bit
        np.testing.assert_array_equal(token_ids, served[0][0])
        np.testing.assert_array_equal(logprobs, served[0][1])


@pytest.mark.slow
def test_a_replica_killed_mid_transfer_fails_its_push_within_the_deadline(
    serve, tiny_models, tmp_path, monkeypatch
):
    """A replica process killed (SIGKILL) after the collective transfer began: the push
    answers that target UNAVAILABLE well within its timeout, no sender is left waiting, and
    the trainer pushes to a live replica next."""
    import threading

    from alignd.local import LocalService
    from alignd_server.common import collective

    started, dead = threading.Event(), threading.Event()
    original = collective._broadcast

    def broadcast(group, tensor, timeout):  # the trainer's side: pause after the first bucket
        original(group, tensor, timeout)
        if not started.is_set():
            started.set()
            assert dead.wait(120)

    replica = LocalService("generation", ["--storage-root", str(tmp_path)],
                           model=str(tiny_models.causal_lm), metrics_port=-1,
                           log_file=tmp_path / "replica.log")  # fmt: skip
    live = serve("generation")
    with replica:
        trainer = serve("trainer", push_targets=[replica.target, live.target])
        with TrainerClient(trainer.target) as client:
            initialize(client, tiny_models.causal_lm)
            monkeypatch.setattr(collective, "_broadcast", broadcast)

            def kill() -> None:
                if started.wait(120):
                    replica.process.kill()
                    replica.process.wait()
                dead.set()

            killer = threading.Thread(target=kill)
            killer.start()
            (result,) = client.push_weights(
                [replica.target], 1, timeout_seconds=60, rendezvous="127.0.0.1:0",
                bucket_bytes=1024,
            )  # fmt: skip
            killer.join(130)
            assert started.is_set() and replica.process.returncode is not None
            assert not result.ok and result.error.startswith("UNAVAILABLE"), result.error
            assert result.seconds < 60
            senders = [t for t in threading.enumerate() if t.name.startswith("collective-push")]
            for sender in senders:  # its peer is gone: it fails, rather than wait its timeout
                sender.join(30)
                assert not sender.is_alive(), "a sender still waits on the killed replica"
            monkeypatch.setattr(collective, "_broadcast", original)
            (after,) = client.push_weights([live.target], 1, rendezvous="127.0.0.1:0")
            assert after.ok, after.error


def test_a_rendezvous_the_trainer_cannot_listen_on_fails_the_push_by_name(serve, tiny_models):
    from alignd.errors import FailedPreconditionError

    replica = serve("generation")
    with TrainerClient(serve("trainer", push_targets=[replica.target]).target) as trainer:
        initialize(trainer, tiny_models.causal_lm)
        refused = r"rendezvous: cannot listen on 192\.0\.2\.1"
        with pytest.raises(FailedPreconditionError, match=refused):
            trainer.push_weights([replica.target], version=1, rendezvous="192.0.2.1:0")
    with GenerationClient(replica.target) as client:
        assert client.info().weights_version == 0
