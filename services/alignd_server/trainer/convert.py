"""Proto -> domain conversion of trainer requests, with field-named validation."""

from __future__ import annotations

import math

import numpy as np

from alignd.models import resolve_model
from alignd.tensors import TensorError, to_numpy, to_ragged
from alignd.v1 import trainer_pb2
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.validation import positive, prompt_lengths, token_rows
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


def _opt(message, name: str, default: float) -> float:
    return getattr(message, name) if message.HasField(name) else default


def init_spec(request: trainer_pb2.InitializeRequest, settings: TrainerSettings) -> InitSpec:
    """Validates an InitializeRequest."""
    if request.kind not in KINDS:
        raise InvalidArgument("kind", "must be CAUSAL_LM, CAUSAL_LM_VALUE or SEQUENCE_CLASSIFIER")
    try:
        path = str(resolve_model(request.model_path or settings.model))
    except FileNotFoundError as err:
        raise InvalidArgument("model_path", str(err)) from None
    dtype = request.dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidArgument("dtype", f"{dtype!r} must be float32, bfloat16 or float16")
    opt = request.optimizer
    lr, eps = _opt(opt, "lr", 1e-5), _opt(opt, "eps", 1e-8)
    betas = (_opt(opt, "beta1", 0.9), _opt(opt, "beta2", 0.999))
    weight_decay = _opt(opt, "weight_decay", 0.0)
    if not (math.isfinite(lr) and lr > 0):
        raise InvalidArgument("optimizer.lr", f"must be > 0, got {lr}")
    for name, beta in zip(("beta1", "beta2"), betas, strict=True):
        if not 0 <= beta < 1:
            raise InvalidArgument(f"optimizer.{name}", f"{beta} is outside [0, 1)")
    if not eps > 0:
        raise InvalidArgument("optimizer.eps", f"must be > 0, got {eps}")
    if not weight_decay >= 0:
        raise InvalidArgument("optimizer.weight_decay", f"must be >= 0, got {weight_decay}")
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
    if not 0 <= schedule.min_lr_ratio <= 1:
        raise InvalidArgument("schedule.min_lr_ratio", "must be in [0, 1]")
    max_norm = request.max_grad_norm if request.HasField("max_grad_norm") else None
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm >= 0):
        raise InvalidArgument("max_grad_norm", f"must be >= 0, got {max_norm}")
    return InitSpec(
        path=path, kind=KINDS[request.kind], dtype=dtype, lr=lr, betas=betas, eps=eps,
        weight_decay=weight_decay, schedule=SCHEDULES[schedule.kind],
        warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps,
        min_lr_ratio=schedule.min_lr_ratio, max_grad_norm=max_norm or None,
        gradient_checkpointing=request.gradient_checkpointing,
        lora=_lora(request.lora) if request.HasField("lora") else None,
        seed=request.seed if request.HasField("seed") else 0,
    )  # fmt: skip


def _lora(message: trainer_pb2.LoraConfig) -> LoraSpec:
    if not 1 <= message.r <= MAX_LORA_RANK:
        raise InvalidArgument("lora.r", f"{message.r} must be in 1 .. {MAX_LORA_RANK}")
    alpha = message.alpha if message.HasField("alpha") else 2.0 * message.r
    if not (math.isfinite(alpha) and alpha > 0):
        raise InvalidArgument("lora.alpha", f"must be > 0, got {alpha}")
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
    values = np.concatenate(rows) if rows else np.zeros(0)
    if not np.isfinite(values.astype(np.float64)).all():
        raise InvalidArgument(field, "must be finite (no NaN or infinity)")
    return [r.astype(np.float32) for r in rows]


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
            values = to_numpy(tensor).astype(np.float32)
        except TensorError as err:
            raise InvalidArgument(field, str(err)) from None
        if values.ndim != 1 or not np.isfinite(values).all():
            raise InvalidArgument(field, "must be a finite 1-D tensor")
        out.sequence_inputs[name] = values
    return out


def loss(message: trainer_pb2.Loss) -> tuple[str, dict, float]:
    """(loss name, its parameters, temperature) from a Loss message."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("loss", "one loss must be set")
    spec = getattr(message, kind)
    temperature = 1.0
    if kind == "cross_entropy":
        params = {"label_smoothing": spec.label_smoothing}
        if not 0 <= spec.label_smoothing < 1:
            raise InvalidArgument("loss.cross_entropy.label_smoothing", "must be in [0, 1)")
    elif kind == "bradley_terry":
        params = {"center_rewards_coefficient": spec.center_rewards_coefficient}
    elif kind == "dpo":
        params = {"variant": DPO_VARIANTS.get(spec.variant, "sigmoid"),
                  "beta": positive(spec, "beta", default=0.1),
                  "label_smoothing": spec.label_smoothing}  # fmt: skip
        if not 0 <= spec.label_smoothing < 0.5:
            raise InvalidArgument("loss.dpo.label_smoothing", "must be in [0, 0.5)")
    elif kind == "kto":
        params = {"beta": positive(spec, "beta", default=0.1),
                  "desirable_weight": positive(spec, "desirable_weight", default=1.0),
                  "undesirable_weight": positive(spec, "undesirable_weight",
                                                 default=1.0)}  # fmt: skip
    elif kind == "ppo":
        params = {"clip_range": positive(spec, "clip_range", default=0.2),
                  "value_clip_range": positive(spec, "value_clip_range", default=0.2),
                  "vf_coef": _opt(spec, "vf_coef", 0.1),
                  "entropy_coef": spec.entropy_coef}  # fmt: skip
        temperature = positive(spec, "temperature", default=1.0)
    else:
        aggregation = {0: "token_mean", 1: "sequence_mean"}.get(spec.aggregation)
        if aggregation is None:
            raise InvalidArgument("loss.policy_gradient.aggregation", "unknown value")
        params = {"clip_range": spec.clip_range if spec.HasField("clip_range") else None,
                  "kl_coef": spec.kl_coef, "aggregation": aggregation}  # fmt: skip
        temperature = positive(spec, "temperature", default=1.0)
    return kind, params, temperature
