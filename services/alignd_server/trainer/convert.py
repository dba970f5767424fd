"""Proto -> domain conversion of trainer requests, with field-named validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignd.models import BUNDLED, resolve_model
from alignd.tensors import TensorError, to_numpy, to_ragged
from alignd.v1 import trainer_pb2
from alignd_server.common import collective
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.storage import StorageRoots
from alignd_server.common.validation import (
    FLOAT32_MAX,
    MAX_VERSION,
    in_range,
    optional_in_range,
    prompt_lengths,
    token_rows,
)
from alignd_server.common.validation import temperature as temperature_of
from alignd_server.trainer.config import TrainerSettings
from alignd_server.trainer.engine import Batch, InitSpec
from alignd_server.trainer.lora import LoraSpec
from alignd_server.trainer.losses import BY_FIELD
from alignd_server.trainer.losses.spec import Param
from alignd_server.trainer.targets import split_address

KINDS = {
    trainer_pb2.MODEL_KIND_CAUSAL_LM: "causal_lm",
    trainer_pb2.MODEL_KIND_CAUSAL_LM_VALUE: "causal_lm_value",
    trainer_pb2.MODEL_KIND_SEQUENCE_CLASSIFIER: "sequence_classifier",
}
SCHEDULES = {
    trainer_pb2.SCHEDULE_KIND_CONSTANT: "constant",
    trainer_pb2.SCHEDULE_KIND_LINEAR: "linear",
    trainer_pb2.SCHEDULE_KIND_COSINE: "cosine",
}
MAX_LORA_RANK = 1024
MAX_TARGETS = 64
MAX_PUSH_TIMEOUT_S = 86400.0
DEFAULT_PUSH_TIMEOUT_S = 300.0
MAX_LORA_ALPHA = 1e4
MAX_PACKING_TOKENS = 1 << 20


# Ranges of the optimizer settings: wide enough for any real run, narrow enough that a value
# cannot turn the weights into NaN on the first step.
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 10.0


def init_spec(
    request: trainer_pb2.InitializeRequest, settings: TrainerSettings, roots: StorageRoots
) -> InitSpec:
    """Validates an InitializeRequest; a ``model_path`` must lie inside the storage roots (or
    name a prepared bundled model)."""
    if request.kind not in KINDS:
        raise InvalidArgument("kind", "must be CAUSAL_LM, CAUSAL_LM_VALUE or SEQUENCE_CLASSIFIER")
    name = request.model_path or settings.model
    if request.model_path and request.model_path not in BUNDLED:  # confined before it is looked
        name = str(roots.resolve(request.model_path, "model_path"))  # at: no existence oracle
    try:
        path = str(resolve_model(name))
    except FileNotFoundError as err:
        raise InvalidArgument("model_path", str(err)) from None
    dtype = request.dtype or settings.dtype  # unset: the server's --dtype, like model_path
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidArgument("dtype", f"{dtype!r} must be float32, bfloat16 or float16")
    opt = request.optimizer
    lr = optional_in_range(opt, "lr", "optimizer.lr", 1e-5, 0, MAX_LR, open_low=True)
    eps = optional_in_range(opt, "eps", "optimizer.eps", 1e-8, 0, 1, open_low=True)
    betas = tuple(
        optional_in_range(opt, name, f"optimizer.{name}", default, 0, 1, open_high=True)
        for name, default in (("beta1", 0.9), ("beta2", 0.999))
    )
    weight_decay = optional_in_range(
        opt, "weight_decay", "optimizer.weight_decay", 0.0, 0, MAX_WEIGHT_DECAY
    )
    schedule = request.schedule
    if schedule.kind not in SCHEDULES:
        raise InvalidArgument("schedule.kind", f"unknown value {schedule.kind}")
    if schedule.warmup_steps < 0:
        raise InvalidArgument("schedule.warmup_steps", "must be >= 0")
    if schedule.kind != trainer_pb2.SCHEDULE_KIND_CONSTANT and (
        schedule.total_steps <= schedule.warmup_steps
    ):
        raise InvalidArgument(
            "schedule.total_steps",
            f"{schedule.total_steps} must exceed warmup_steps {schedule.warmup_steps}",
        )
    in_range(schedule.min_lr_ratio, "schedule.min_lr_ratio", 0, 1)
    max_norm = optional_in_range(request, "max_grad_norm", "max_grad_norm", 0.0, 0, FLOAT32_MAX)
    packing = request.HasField("packing")
    tokens = request.packing.max_tokens
    if packing and tokens and not 2 <= tokens <= MAX_PACKING_TOKENS:
        limit = f"0 (chosen per batch) or 2 .. {MAX_PACKING_TOKENS}"
        raise InvalidArgument("packing.max_tokens", f"{tokens} must be {limit}")
    return InitSpec(
        path=path, kind=KINDS[request.kind], dtype=dtype, lr=lr, betas=betas, eps=eps,
        weight_decay=weight_decay, schedule=SCHEDULES[schedule.kind],
        warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps,
        min_lr_ratio=schedule.min_lr_ratio, max_grad_norm=max_norm or None,
        gradient_checkpointing=request.gradient_checkpointing,
        lora=_lora(request.lora) if request.HasField("lora") else None,
        seed=request.seed if request.HasField("seed") else 0,
        packing=packing, packing_tokens=tokens,
    )  # fmt: skip


@dataclass(frozen=True)
class PushSpec:
    """A checked PushWeightsRequest (the targets still to be checked against the allowed)."""

    addresses: list[str]
    version: int
    timeout: float
    shared: Path | None
    rendezvous: tuple[str, int] | None = None
    """The collective transport: the address the trainer listens on for the rendezvous."""
    bucket_bytes: int = collective.DEFAULT_BUCKET_BYTES


def push_spec(request: trainer_pb2.PushWeightsRequest, roots: StorageRoots) -> PushSpec:
    """Validates a PushWeightsRequest: 1 .. 64 targets, a version in [1, MAX_VERSION], a
    timeout in (0, 86400] s (at most 3600 s with the collective transport, whose waits the
    timeout bounds), a shared path inside the storage roots or a rendezvous address and
    bucket size (not both)."""
    if not 1 <= len(request.targets) <= MAX_TARGETS:
        raise InvalidArgument(
            "targets", f"{len(request.targets)} targets, must be 1 .. {MAX_TARGETS}"
        )
    if not 1 <= request.version <= MAX_VERSION:
        raise InvalidArgument("version", f"{request.version} is outside [1, {MAX_VERSION}]")
    timeout = DEFAULT_PUSH_TIMEOUT_S
    if request.timeout_seconds:
        timeout = in_range(
            request.timeout_seconds, "timeout_seconds", 0, MAX_PUSH_TIMEOUT_S, open_low=True
        )
    shared = None
    if request.shared_path:
        shared = roots.resolve(request.shared_path, "shared_path", write=True)
    rendezvous, bucket = None, collective.DEFAULT_BUCKET_BYTES
    if request.rendezvous:
        if shared is not None:
            raise InvalidArgument("rendezvous", "choose one transport: not with shared_path")
        try:
            rendezvous = split_address(request.rendezvous, free_port=True)
        except ValueError as err:
            raise InvalidArgument("rendezvous", str(err)) from None
        if request.timeout_seconds:
            in_range(request.timeout_seconds, "timeout_seconds", 0, collective.MAX_TIMEOUT_S,
                     open_low=True)  # fmt: skip
    if request.bucket_bytes:
        if rendezvous is None:
            raise InvalidArgument("bucket_bytes", "applies to the collective transport only "
                                  "(set rendezvous)")  # fmt: skip
        bucket = int(in_range(request.bucket_bytes, "bucket_bytes", collective.MIN_BUCKET_BYTES,
                              collective.MAX_BUCKET_BYTES))  # fmt: skip
    return PushSpec([t.address for t in request.targets], request.version, timeout, shared,
                    rendezvous, bucket)  # fmt: skip


def _lora(message: trainer_pb2.LoraConfig) -> LoraSpec:
    if not 1 <= message.r <= MAX_LORA_RANK:
        raise InvalidArgument("lora.r", f"{message.r} must be in 1 .. {MAX_LORA_RANK}")
    alpha = optional_in_range(
        message, "alpha", "lora.alpha", 2.0 * message.r, 0, MAX_LORA_ALPHA, open_low=True
    )
    if not 0 <= message.dropout < 1:
        raise InvalidArgument("lora.dropout", f"{message.dropout} is outside [0, 1)")
    for i, name in enumerate(message.target_modules):
        if not name.strip():
            raise InvalidArgument(f"lora.target_modules[{i}]", "must not be empty")
    return LoraSpec(
        r=message.r, alpha=alpha, dropout=message.dropout,
        target_modules=list(message.target_modules),
    )  # fmt: skip


def _float_rows(ragged, field: str, lengths: list[int]) -> list[np.ndarray]:
    try:
        rows = to_ragged(ragged)
    except TensorError as err:
        raise InvalidArgument(field, str(err)) from None
    if [len(r) for r in rows] != lengths:
        raise InvalidArgument(
            field,
            f"row lengths {[len(r) for r in rows]} must equal the completion lengths {lengths}",
        )
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
        rows = [r.astype(np.float32) for r in rows]
    if rows and not np.isfinite(np.concatenate(rows)).all():
        raise InvalidArgument(field, "must be finite in float32 (no NaN, infinity or |x| > 3.4e38)")
    return rows


def batch(
    message: trainer_pb2.Batch, *, vocab_size: int, settings: TrainerSettings, classifier: bool
) -> Batch:
    """Decodes and checks a Batch: ids, prompt lengths, masks and named inputs."""
    rows = token_rows(
        message.input_ids, "batch.input_ids", vocab_size=vocab_size,
        max_batch_size=settings.max_batch_size, max_length=settings.max_sequence_length,
        min_length=1 if classifier else 2,
    )  # fmt: skip
    if classifier and not message.prompt_lengths:
        prompts = np.zeros(len(rows), dtype=np.int64)
    else:
        prompts = prompt_lengths(
            message.prompt_lengths, rows, "batch.prompt_lengths", min_prompt=0 if classifier else 1
        )
    lengths = [len(r) - int(p) for r, p in zip(rows, prompts, strict=True)]
    out = Batch(rows=rows, prompts=prompts)
    if message.HasField("completion_mask"):
        out.completion_mask = _float_rows(message.completion_mask, "batch.completion_mask", lengths)
    for name, ragged in message.token_inputs.items():
        out.token_inputs[name] = _float_rows(ragged, f'batch.token_inputs["{name}"]', lengths)
    for name, tensor in message.sequence_inputs.items():
        field = f'batch.sequence_inputs["{name}"]'
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
                values = to_numpy(tensor).astype(np.float32)
        except TensorError as err:
            raise InvalidArgument(field, str(err)) from None
        if values.ndim != 1 or not np.isfinite(values).all():
            raise InvalidArgument(field, "must be a finite 1-D tensor")
        out.sequence_inputs[name] = values
    return out


MAX_LOSS_SCALE = 65536.0


def _param(fields, prefix: str, param: Param) -> float | str | None:
    """``fields.<param.name>`` checked against the spec's range or choices; the spec's default
    when an optional field is unset."""
    name, field = param.name, f"{prefix}.{param.name}"
    if fields.DESCRIPTOR.fields_by_name[name].has_presence and not fields.HasField(name):
        return param.default
    value = getattr(fields, name)
    if param.choices:
        if not 0 <= value < len(param.choices):
            raise InvalidArgument(field, f"unknown value {value}")
        return param.choices[value]
    bounds = param.range
    return in_range(
        value, field, bounds.low, bounds.high, open_low=bounds.open_low,
        open_high=bounds.open_high,
    )  # fmt: skip


def loss(message: trainer_pb2.Loss) -> tuple[str, dict, float]:
    """(loss name, its parameters, temperature) from a Loss message, every parameter checked
    against the range its loss's spec gives (naming the field, e.g. ``loss.ppo.clip_range``)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("loss", "one loss must be set")
    spec, fields, prefix = BY_FIELD[kind], getattr(message, kind), f"loss.{kind}"
    params = {param.name: _param(fields, prefix, param) for param in spec.params}
    temperature = temperature_of(fields, f"{prefix}.temperature") if spec.temperature else 1.0
    return spec.name, params, temperature
