"""Client of the TrainerService: the training primitives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignd.clients.tokenize import AsyncTokenizingClient, TokenizingClient
from alignd.losses import Loss
from alignd.tensors import from_numpy, from_ragged, to_numpy, to_ragged
from alignd.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

SERVICE = "alignd.v1.TrainerService"
TRAINER_TIMEOUT_S = 1800.0
"""Default deadline of trainer calls: they compute, and a slow machine or a large model can
take minutes for one; liveness comes from keepalive, not from this."""
KINDS = {
    "causal_lm": trainer_pb2.MODEL_KIND_CAUSAL_LM,
    "causal_lm_value": trainer_pb2.MODEL_KIND_CAUSAL_LM_VALUE,
    "sequence_classifier": trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER,
}
SCHEDULES = {"constant": 0, "linear": 1, "cosine": 2}
OUTPUTS = {"logprobs": 1, "values": 2, "entropy": 3, "rewards": 4}


@dataclass
class TrainBatch:
    """Token sequences and the per-token / per-sequence inputs a loss needs.

    Attributes:
        input_ids: B rows of token ids (prompt then completion).
        prompt_lengths: B prompt lengths.
        completion_mask: optional B rows of 0/1 over completion tokens.
        token_inputs: named B rows over completion tokens (old_logprobs, advantages, ...).
        sequence_inputs: named per-sequence arrays (ref_logps, labels, kl_rows, margins).
    """

    input_ids: Sequence[Sequence[int] | np.ndarray]
    prompt_lengths: Sequence[int]
    completion_mask: Sequence[np.ndarray] | None = None
    token_inputs: Mapping[str, Sequence[np.ndarray]] = field(default_factory=dict)
    sequence_inputs: Mapping[str, np.ndarray] = field(default_factory=dict)

    def to_proto(self) -> trainer_pb2.Batch:
        rows = [np.asarray(r, dtype=np.int32) for r in self.input_ids]
        batch = trainer_pb2.Batch(
            input_ids=from_ragged(rows, common_pb2.DTYPE_INT32),
            prompt_lengths=list(self.prompt_lengths),
        )
        if self.completion_mask is not None:
            masks = [np.asarray(m, dtype=np.float32) for m in self.completion_mask]
            batch.completion_mask.CopyFrom(from_ragged(masks, common_pb2.DTYPE_FLOAT32))
        for name, values in self.token_inputs.items():
            rows_f = [np.asarray(v, dtype=np.float32) for v in values]
            batch.token_inputs[name].CopyFrom(from_ragged(rows_f, common_pb2.DTYPE_FLOAT32))
        for name, values in self.sequence_inputs.items():
            batch.sequence_inputs[name].CopyFrom(from_numpy(np.asarray(values, dtype=np.float32)))
        return batch


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters instead of full fine-tuning.

    Attributes:
        r: rank, >= 1.
        alpha: scaling α (the update is α / r · B A); default 2 · r.
        dropout: dropout on the adapters' input during ForwardBackward, in [0, 1).
        target_modules: module names to adapt; empty = every linear layer of the blocks.
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: Sequence[str] = ()

    def to_proto(self) -> trainer_pb2.LoraConfig:
        return trainer_pb2.LoraConfig(
            r=self.r, alpha=self.alpha, dropout=self.dropout,
            target_modules=list(self.target_modules),
        )  # fmt: skip


def initialize_request(
    model_path: str = "", kind: str = "causal_lm", **options
) -> trainer_pb2.InitializeRequest:
    """An InitializeRequest; options: lr, betas, eps, weight_decay, schedule, warmup_steps,
    total_steps, min_lr_ratio, max_grad_norm, gradient_checkpointing, lora (a
    :class:`LoraConfig`), seed, dtype, packing (padding-free batches) and packing_max_tokens
    (most tokens per packed sequence; 0 = chosen per batch)."""
    betas = options.pop("betas", None)
    optimizer = trainer_pb2.AdamWConfig(
        lr=options.pop("lr", None), eps=options.pop("eps", None),
        weight_decay=options.pop("weight_decay", None),
        beta1=betas[0] if betas else None, beta2=betas[1] if betas else None,
    )  # fmt: skip
    schedule = trainer_pb2.ScheduleConfig(
        kind=SCHEDULES[options.pop("schedule", "constant")],
        warmup_steps=options.pop("warmup_steps", 0), total_steps=options.pop("total_steps", 0),
        min_lr_ratio=options.pop("min_lr_ratio", 0.0),
    )  # fmt: skip
    lora = options.pop("lora", None)
    packing, max_tokens = options.pop("packing", False), options.pop("packing_max_tokens", 0)
    if max_tokens and not packing:
        raise ValueError("packing_max_tokens needs packing=True")
    request = trainer_pb2.InitializeRequest(
        model_path=str(model_path), kind=KINDS[kind], optimizer=optimizer, schedule=schedule,
        dtype=options.pop("dtype", ""), max_grad_norm=options.pop("max_grad_norm", None),
        gradient_checkpointing=options.pop("gradient_checkpointing", False),
        lora=lora.to_proto() if lora is not None else None, seed=options.pop("seed", None),
        packing=trainer_pb2.PackingConfig(max_tokens=max_tokens) if packing else None,
    )  # fmt: skip
    if options:
        raise TypeError(f"unknown initialize options: {sorted(options)}")
    return request


def forward_request(
    batch: TrainBatch, outputs: Sequence[str], temperature: float | None
) -> trainer_pb2.ForwardRequest:
    """A ForwardRequest for the named outputs."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {', '.join(OUTPUTS)}")
    return trainer_pb2.ForwardRequest(
        batch=batch.to_proto(), outputs=[OUTPUTS[o] for o in outputs], temperature=temperature
    )


def forward_result(
    response: trainer_pb2.ForwardResponse, outputs: Sequence[str]
) -> dict[str, list[np.ndarray] | np.ndarray]:
    """The decoded outputs of a ForwardResponse, by name."""
    result: dict[str, list[np.ndarray] | np.ndarray] = {}
    for name in outputs:
        if name == "rewards":
            result[name] = to_numpy(response.rewards)
        else:
            result[name] = to_ragged(getattr(response, name))
    return result


def push_request(
    targets: Sequence[str], version: int, timeout_seconds: float, shared_path: str,
    rendezvous: str = "", bucket_bytes: int = 0,
) -> trainer_pb2.PushWeightsRequest:  # fmt: skip
    """A PushWeightsRequest to ``targets`` (``shared_path`` or ``rendezvous`` pick the
    transport; neither = the gRPC stream)."""
    return trainer_pb2.PushWeightsRequest(
        targets=[trainer_pb2.PushTarget(address=t) for t in targets], version=version,
        timeout_seconds=timeout_seconds, shared_path=shared_path, rendezvous=rendezvous,
        bucket_bytes=bucket_bytes,
    )  # fmt: skip


class _Primitives:
    """The primitives whose answer is the response message itself.

    Written once for both clients: ``self._call`` returns the response (sync client) or an
    awaitable of it (asyncio client).
    """

    _call: Callable[..., Any]

    def info(self, *, timeout: float | None = None):
        """Model (once initialized), limits and parallelism (``TrainerInfo``)."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    def state(self, *, timeout: float | None = None):
        """Step, model and optimizer state (``TrainerState``)."""
        return self._call("GetState", trainer_pb2.GetStateRequest(), timeout=timeout)

    def initialize(
        self, model_path: str = "", kind: str = "causal_lm", *, timeout: float | None = None,
        **options,
    ):  # fmt: skip
        """Loads a model and builds its optimizer (see :func:`initialize_request`);
        ``InitializeResponse``."""
        return self._call("Initialize", initialize_request(model_path, kind, **options),
                          timeout=timeout)  # fmt: skip

    def forward_backward(
        self, batch: TrainBatch, loss: Loss, *, loss_scale: float | None = None,
        defer_sync: bool = False, timeout: float | None = None,
    ):  # fmt: skip
        """Computes ``loss`` on ``batch`` and accumulates its gradients
        (``ForwardBackwardResponse``: loss, metrics, tokens). ``defer_sync``: more micro-batches
        follow before ``optim_step``, so a trainer with several ranks may keep this one's
        gradients local and reduce them with the next (the last one must leave it false)."""
        request = trainer_pb2.ForwardBackwardRequest(
            batch=batch.to_proto(), loss=loss.to_proto(), loss_scale=loss_scale,
            defer_sync=defer_sync,
        )  # fmt: skip
        return self._call("ForwardBackward", request, timeout=timeout)

    def optim_step(self, *, timeout: float | None = None):
        """Clips, steps, schedules and zeroes the gradients (``OptimStepResponse``)."""
        return self._call("OptimStep", trainer_pb2.OptimStepRequest(), timeout=timeout)

    def save_checkpoint(
        self, path: str, *, include_optimizer: bool = True, timeout: float | None = None
    ):
        """Writes a checkpoint directory atomically (``SaveCheckpointResponse``)."""
        request = trainer_pb2.SaveCheckpointRequest(
            path=str(path), include_optimizer=include_optimizer
        )
        return self._call("SaveCheckpoint", request, timeout=timeout)

    def load_checkpoint(
        self, path: str, *, load_optimizer: bool = True, timeout: float | None = None
    ):
        """Restores a checkpoint and its training state (``LoadCheckpointResponse``)."""
        request = trainer_pb2.LoadCheckpointRequest(path=str(path), load_optimizer=load_optimizer)
        return self._call("LoadCheckpoint", request, timeout=timeout)


class TrainerClient(_Primitives, TokenizingClient):
    """Sync client of the trainer service. Its calls compute (a forward-backward of a large
    model on a busy machine can take many minutes), so their deadline defaults to 30 minutes;
    a dead server or connection is noticed by keepalive long before."""

    service = SERVICE
    stub_class = trainer_pb2_grpc.TrainerServiceStub
    default_timeout = TRAINER_TIMEOUT_S

    def forward(
        self, batch: TrainBatch, outputs: Sequence[str] = ("logprobs",), *,
        temperature: float | None = None, timeout: float | None = None,
    ) -> dict[str, list[np.ndarray] | np.ndarray]:  # fmt: skip
        """No-grad outputs: per-token ``logprobs``/``values``/``entropy`` rows, or ``rewards``."""
        response = self._call(
            "Forward", forward_request(batch, outputs, temperature), timeout=timeout
        )
        return forward_result(response, outputs)

    def push_weights(
        self, targets: Sequence[str], version: int, *, timeout_seconds: float = 300.0,
        shared_path: str = "", rendezvous: str = "", bucket_bytes: int = 0,
        timeout: float | None = None,
    ) -> list[trainer_pb2.PushResult]:  # fmt: skip
        """Pushes the policy to generation services; one result per target."""
        request = push_request(
            targets, version, timeout_seconds, shared_path, rendezvous, bucket_bytes
        )
        response = self._call("PushWeights", request, timeout=timeout or timeout_seconds + 60)
        return list(response.results)


class AsyncTrainerClient(_Primitives, AsyncTokenizingClient):
    """asyncio client of the trainer service: the same primitives, awaited."""

    service = SERVICE
    stub_class = trainer_pb2_grpc.TrainerServiceStub
    default_timeout = TRAINER_TIMEOUT_S

    async def forward(
        self, batch: TrainBatch, outputs: Sequence[str] = ("logprobs",), *,
        temperature: float | None = None, timeout: float | None = None,
    ) -> dict[str, list[np.ndarray] | np.ndarray]:  # fmt: skip
        """No-grad outputs: per-token ``logprobs``/``values``/``entropy`` rows, or ``rewards``."""
        response = await self._call(
            "Forward", forward_request(batch, outputs, temperature), timeout=timeout
        )
        return forward_result(response, outputs)

    async def push_weights(
        self, targets: Sequence[str], version: int, *, timeout_seconds: float = 300.0,
        shared_path: str = "", rendezvous: str = "", bucket_bytes: int = 0,
        timeout: float | None = None,
    ) -> list[trainer_pb2.PushResult]:  # fmt: skip
        """Pushes the policy to generation services; one result per target."""
        request = push_request(
            targets, version, timeout_seconds, shared_path, rendezvous, bucket_bytes
        )
        response = await self._call("PushWeights", request, timeout=timeout or timeout_seconds + 60)
        return list(response.results)
