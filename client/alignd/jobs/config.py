"""One pydantic model per job kind, loadable from YAML with errors that name the field.

A job file is a mapping with ``kind: sft | reward_model | dpo | ppo | grpo``; everything else
has a default except the dataset path::

    kind: dpo
    run_dir: runs/dpo
    model: runs/sft/checkpoints/final
    data: {path: pairs.jsonl}
    beta: 0.1
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class ConfigError(ValueError):
    """A job configuration is invalid; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the examples come from and how their records are laid out."""

    path: Path
    """A JSONL, JSON, Parquet file or a local ``datasets`` directory."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Record field names when they differ from ``prompt``/``response``/``chosen``/…"""
    split: str = "train"
    """The split of a ``DatasetDict`` directory."""
    eval_path: Path | None = None
    """Held-out examples; unset = split ``held_out`` off ``path``."""
    held_out: float | int = 0.1
    """Fraction (0, 1) or count of examples (prompts, for prompt datasets) held out."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N training records."""


class LoraOptions(_Strict):
    """Low-rank adapters (see ``alignd.clients.trainer.LoraConfig``)."""

    r: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=list)


class OptimConfig(_Strict):
    """The trainer's optimizer and schedule."""

    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    lora: LoraOptions | None = None


class JobConfig(_Strict):
    """What every job shares."""

    kind: str
    name: str = ""
    """A label for logs and the report; default: the kind."""
    run_dir: Path = Path("runs/job")
    """Where the job writes config, metrics, plots, checkpoints and its state."""
    model: str = ""
    """The model the trainer starts from (path or bundled name; empty = the trainer's)."""
    data: DataConfig
    seed: int = 0
    max_length: int = Field(256, ge=2)
    """Most tokens per sequence (prompt + completion)."""
    batch_size: int = Field(8, ge=1)
    """Examples per optimizer step."""
    micro_batch_size: int = Field(0, ge=0)
    """Examples per ForwardBackward (gradients accumulate); 0 = ``batch_size``."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed); ``max_steps`` caps it."""
    max_steps: int | None = Field(None, ge=1)
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: at the end only)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: at the end only)."""
    optim: OptimConfig = OptimConfig()
    retry_seconds: float = Field(300.0, ge=0)
    """How long a call to a restarting service is retried (with backoff) before failing."""
    trainer_timeout_s: float = Field(1800.0, gt=0)
    """Deadline of each trainer call (ForwardBackward, Forward, OptimStep, Initialize,
    checkpoints, PushWeights): generous, since a step of a large model on a busy machine can
    take minutes; a dead trainer is noticed by keepalive long before."""
    service_timeout_s: float = Field(600.0, gt=0)
    """Deadline of each call to generation, reward and reference (a round's Generate can take
    minutes on a CPU); such calls are retried for ``retry_seconds`` when they fail."""

    @model_validator(mode="after")
    def _micro_batch(self) -> JobConfig:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ValueError(f"micro_batch_size {micro} must divide batch_size {self.batch_size}")
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size


class SFTConfig(JobConfig):
    """Supervised fine-tuning: masked-prompt cross-entropy on (prompt, response)."""

    kind: Literal["sft"] = "sft"
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class RewardModelConfig(JobConfig):
    """A reward model: Bradley–Terry on preference pairs, scored by a sequence classifier."""

    kind: Literal["reward_model"] = "reward_model"
    model: str = "minilm-l6"
    center_rewards_coefficient: float = Field(0.0, ge=0)


class DPOConfig(JobConfig):
    """Direct preference optimisation against reference log-probs cached in the run dir."""

    kind: Literal["dpo"] = "dpo"
    variant: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class RolloutConfig(_Strict):
    """How completions are sampled from the generation service."""

    prompts_per_round: int = Field(16, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    scorer: str = ""
    """The reward service's scorer; empty = its default."""


class PPOConfig(JobConfig):
    """PPO with a value head, per-token KL penalty and GAE (Ouyang et al. 2022's recipe)."""

    kind: Literal["ppo"] = "ppo"
    rounds: int = Field(20, ge=1)
    rollout: RolloutConfig = RolloutConfig()
    ppo_epochs: int = Field(2, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0)
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, ge=1)
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that did not end with EOS."""
    reward_clip: float | None = Field(None, gt=0)
    whiten_rewards: bool = False
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)


class GRPOConfig(JobConfig):
    """Critic-free policy gradient with group baselines: GRPO or RLOO."""

    kind: Literal["grpo"] = "grpo"
    rounds: int = Field(20, ge=1)
    rollout: RolloutConfig = RolloutConfig(prompts_per_round=4)
    group_size: int = Field(4, ge=2)
    baseline: Literal["grpo", "rloo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epochs_per_round: int = Field(1, ge=1)
    kl_coef: float = Field(0.0, ge=0)
    clip_range: float | None = Field(0.2, gt=0)
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"


AnyJobConfig = Annotated[
    SFTConfig | RewardModelConfig | DPOConfig | PPOConfig | GRPOConfig,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter = TypeAdapter(AnyJobConfig)


def _describe(error: ValidationError, source: str) -> ConfigError:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"] if p not in _KINDS) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return ConfigError(f"{source}: invalid job config\n" + "\n".join(lines))


_KINDS = ("sft", "reward_model", "dpo", "ppo", "grpo")


def parse_job_config(document: Any, source: str = "config") -> JobConfig:
    """Validates a mapping as the job config its ``kind`` names.

    Raises:
        ConfigError: naming each bad field, e.g. ``rollout.temperature: Input should be
            greater than 0``.
    """
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: a job config is a mapping, got {type(document).__name__}")
    try:
        return _ADAPTER.validate_python(document)
    except ValidationError as err:
        raise _describe(err, source) from None


def load_job_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Reads a job config from YAML (relative data paths resolve against the file's folder).

    Raises:
        ConfigError: unreadable YAML or invalid fields.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None
    if isinstance(document, dict):
        document = {**document, **(overrides or {})}
        data = document.get("data")
        if isinstance(data, dict):
            for key in ("path", "eval_path"):
                if data.get(key) and not Path(data[key]).is_absolute():
                    candidate = path.parent / data[key]
                    if candidate.exists():
                        data = {**data, key: str(candidate)}
            document["data"] = data
    return parse_job_config(document, str(path))
