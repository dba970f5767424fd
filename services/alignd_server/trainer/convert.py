"""Proto -> domain conversion of trainer requests, with field-named validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignd.models import BUNDLED, resolve_model
from alignd.tensors import TensorError, to_numpy, to_ragged
from alignd.v1 import trainer_pb2
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
DPO_VARIANTS = {0: "sigmoid", 1: "ipo", 2: "hinge", 3: "robust"}
MAX_LORA_RANK = 1024
MAX_TARGETS = 64
MAX_PUSH_TIMEOUT_S = 86400.0
DEFAULT_PUSH_TIMEOUT_S = 300.0
MAX_LORA_ALPHA = 1e4


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
    dtype = request.dtype or "float32"
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
    return InitSpec(
        path=path, kind=KINDS[request.kind], dtype=dtype, lr=lr, betas=betas, eps=eps,
        weight_decay=weight_decay, schedule=SCHEDULES[schedule.kind],
        warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps,
        min_lr_ratio=schedule.min_lr_ratio, max_grad_norm=max_norm or None,
        gradient_checkpointing=request.gradient_checkpointing,
        lora=_lora(request.lora) if request.HasField("lora") else None,
        seed=request.seed if request.HasField("seed") else 0,
    )  # fmt: skip


@dataclass(frozen=True)
class PushSpec:
    """A checked PushWeightsRequest (the targets still to be checked against the allowed)."""

    addresses: list[str]
    version: int
    timeout: float
    shared: Path | None


def push_spec(request: trainer_pb2.PushWeightsRequest, roots: StorageRoots) -> PushSpec:
    """Validates a PushWeightsRequest: 1 .. 64 targets, a version in [1, MAX_VERSION], a
    timeout in (0, 86400] s, a shared path inside the storage roots."""
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
    return PushSpec([t.address for t in request.targets], request.version, timeout, shared)


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


# The range of every loss hyper-parameter: (low, high, open_low, open_high).
COEFFICIENT = (0.0, 1e3, False, False)
POSITIVE = (0.0, 1e3, True, False)
CLIP = (0.0, 10.0, True, False)
FRACTION = (0.0, 1.0, False, True)
BELOW_HALF = (0.0, 0.5, False, True)
MAX_LOSS_SCALE = 65536.0


def _param(spec, kind: str, name: str, default: float | None, bounds: tuple) -> float | None:
    """``spec.name`` checked against ``bounds``; ``default`` when an optional field is unset."""
    if spec.DESCRIPTOR.fields_by_name[name].has_presence and not spec.HasField(name):
        return default
    low, high, open_low, open_high = bounds
    return in_range(
        getattr(spec, name), f"loss.{kind}.{name}", low, high, open_low=open_low,
        open_high=open_high,
    )  # fmt: skip


def loss(message: trainer_pb2.Loss) -> tuple[str, dict, float]:
    """(loss name, its parameters, temperature) from a Loss message, every parameter checked
    against its range (naming the field, e.g. ``loss.ppo.clip_range``)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("loss", "one loss must be set")
    spec = getattr(message, kind)
    temperature = 1.0
    if kind == "cross_entropy":
        params = {"label_smoothing": _param(spec, kind, "label_smoothing", 0.0, FRACTION)}
    elif kind == "bradley_terry":
        params = {"center_rewards_coefficient": _param(
            spec, kind, "center_rewards_coefficient", 0.0, COEFFICIENT)}  # fmt: skip
    elif kind == "dpo":
        if spec.variant not in DPO_VARIANTS:
            raise InvalidArgument("loss.dpo.variant", f"unknown value {spec.variant}")
        params = {"variant": DPO_VARIANTS[spec.variant],
                  "beta": _param(spec, kind, "beta", 0.1, POSITIVE),
                  "label_smoothing": _param(spec, kind, "label_smoothing", 0.0,
                                            BELOW_HALF)}  # fmt: skip
    elif kind == "kto":
        params = {
            name: _param(spec, kind, name, default, POSITIVE)
            for name, default in (
                ("beta", 0.1),
                ("desirable_weight", 1.0),
                ("undesirable_weight", 1.0),
            )
        }
    elif kind == "ppo":
        params = {
            "clip_range": _param(spec, kind, "clip_range", 0.2, CLIP),
            "value_clip_range": _param(spec, kind, "value_clip_range", 0.2, POSITIVE),
            "vf_coef": _param(spec, kind, "vf_coef", 0.1, COEFFICIENT),
            "entropy_coef": _param(spec, kind, "entropy_coef", 0.0, COEFFICIENT),
        }
        temperature = temperature_of(spec, "loss.ppo.temperature")
    else:
        aggregation = {0: "token_mean", 1: "sequence_mean"}.get(spec.aggregation)
        if aggregation is None:
            raise InvalidArgument("loss.policy_gradient.aggregation", "unknown value")
        params = {"clip_range": _param(spec, kind, "clip_range", None, CLIP),
                  "kl_coef": _param(spec, kind, "kl_coef", 0.0, COEFFICIENT),
                  "aggregation": aggregation}  # fmt: skip
        temperature = temperature_of(spec, "loss.policy_gradient.temperature")
    return kind, params, temperature
