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

from alignd import losses


class ConfigError(ValueError):
    """A job configuration is invalid; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


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
    """Rank of each adapter (A is r x in, B is out x r)."""
    alpha: float | None = Field(None, gt=0)
    """Scale α of the adapters' output (α / r · B A x); unset = 2r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input while training."""
    target_modules: list[str] = Field(default_factory=list)
    """Module names to adapt; empty = every linear layer of the blocks."""


class OptimConfig(_Strict):
    """The trainer's optimizer and schedule."""

    lr: float = Field(1e-5, gt=0, le=1)
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's β1, β2, each in [0, 1)."""
    weight_decay: float = Field(0.0, ge=0, le=10)
    """Decoupled weight decay."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup, down to 0 at the run's last optimizer step."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup."""
    max_grad_norm: float | None = Field(1.0, ge=0)
    """Clip the global gradient norm to this; unset or 0 = no clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    packing: bool = False
    """Padding-free batches: the trainer lays each micro-batch's rows end to end in packed
    sequences, so no compute goes to padding (causal models only; same losses)."""
    packing_max_tokens: int = Field(0, ge=0, le=1 << 20)
    """Most tokens per packed sequence with ``packing``; 0 = the trainer chooses per batch."""
    lora: LoraOptions | None = None
    """Train low-rank adapters instead of every weight; unset = full fine-tuning."""

    @model_validator(mode="after")
    def _max_tokens_need_packing(self) -> OptimConfig:
        if self.packing_max_tokens and not self.packing:
            raise ValueError("packing_max_tokens needs packing: true")
        if self.packing_max_tokens == 1:
            raise ValueError("packing_max_tokens must be 0 (chosen per batch) or >= 2")
        return self


class JobConfig(_Strict):
    """What every job shares."""

    kind: str
    """The job: ``sft``, ``reward_model``, ``dpo``, ``ppo`` or ``grpo``."""
    name: str = ""
    """A label for logs and the report; default: the kind."""
    run_dir: Path = Path("runs/job")
    """Where the job writes config, metrics, plots, checkpoints and its state."""
    model: str = ""
    """The model the trainer starts from (path or bundled name; empty = the trainer's)."""
    data: DataConfig
    """The dataset."""
    seed: int = 0
    """Seed of data order, sampling and fresh weights; a run is a function of it."""
    max_length: int = Field(256, ge=2)
    """Most tokens per sequence (prompt + completion)."""
    batch_size: int = Field(8, ge=1)
    """Examples per optimizer step."""
    micro_batch_size: int = Field(0, ge=0)
    """Examples per ForwardBackward (gradients accumulate); 0 = ``batch_size``."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (fractions allowed); ``max_steps`` caps it."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many steps (online jobs: rounds); unset = as ``epochs`` / ``rounds``
    say."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: at the end only)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: at the end only)."""
    optim: OptimConfig = OptimConfig()
    """The trainer's optimizer and schedule."""
    retry_seconds: float = Field(300.0, ge=0)
    """How long a call to a restarting service is retried (with backoff) before failing."""
    trainer_timeout_s: float = Field(1800.0, gt=0)
    """Deadline of each trainer call (ForwardBackward, Forward, OptimStep, Initialize,
    checkpoints, PushWeights): generous, since a step of a large model on a busy machine can
    take minutes; a dead trainer is noticed by keepalive long before."""
    deterministic: bool = False
    """Reproducible mode: the generation, reward and reference services batch this job's
    requests only with each other (isolated requests), so two runs with the same seed give
    bit-identical metrics whatever else the services serve; start the services with
    ``--deterministic`` for deterministic torch algorithms (on GPU). Costs batching across
    callers (an isolated Generate runs alone on its replica), nothing else."""
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
    """Supervised fine-tuning."""
    label_smoothing: float = Field(losses.CrossEntropy.label_smoothing, ge=0, lt=1)
    """Label smoothing of the cross-entropy, in [0, 1)."""


class RewardModelConfig(JobConfig):
    """A reward model: Bradley–Terry on preference pairs, scored by a sequence classifier."""

    kind: Literal["reward_model"] = "reward_model"
    """A Bradley–Terry reward model."""
    model: str = "minilm-l6"
    """The backbone the classifier starts from (a fresh scalar head is added if it has none)."""
    center_rewards_coefficient: float = Field(
        losses.BradleyTerry.center_rewards_coefficient, ge=0, le=1000
    )
    """Weight of the (r_chosen + r_rejected)² penalty that keeps rewards centred at 0
    (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``)."""


class EarlyStopConfig(_Strict):
    """Stop an online run once the gold score has stopped improving while the proxy (the
    training scorer's) kept rising — the over-optimisation signature (Gao et al. 2022)."""

    patience: int = Field(3, ge=1, le=1000)
    """Evaluations without a gold improvement (while the proxy rose past its value at the best
    gold) after which the run stops."""
    min_delta: float = Field(0.0, ge=0)
    """How much the gold score must rise over its best to count as an improvement."""


class _GoldTracking(_Strict):
    """A held-out gold score beside the training signal, and stopping on it (online jobs and
    DPO)."""

    gold_scorer: str = ""
    """A reward-service scorer (a function oracle, an ensemble, a bigger model) that scores
    held-out completions of the policy at every evaluation: ``eval/gold``, ``eval/gold_se``.
    Online jobs: the same completions the training scorer scores (``eval/reward``), which
    must be another scorer. DPO: each evaluation pushes the policy to the generation
    replicas and samples the held-out prompts. Whenever the gold reaches a new best, the
    trainer's weights are checkpointed to ``checkpoints/best`` (state.json's ``gold`` says
    which step). A name the reward service does not have fails the job at set-up."""
    early_stop: EarlyStopConfig | None = None
    """Stop when the gold score has not improved for ``patience`` evaluations while the proxy
    (online jobs: ``eval/reward``; DPO: the implicit reward margin ``eval/margin``) rose above
    its value at the best gold; the last step is logged with ``early_stop: 1`` and
    checkpointed as ``final``, the best stays in ``checkpoints/best``. Needs ``gold_scorer``
    and ``eval_every``."""

    @model_validator(mode="after")
    def _early_stop_needs(self) -> _GoldTracking:
        if self.early_stop is not None:
            if not self.gold_scorer:
                raise ValueError("early_stop needs gold_scorer: it stops on the gold score")
            if not self.eval_every:
                raise ValueError("early_stop needs eval_every: it decides at each evaluation")
        return self


class DPOConfig(_GoldTracking, JobConfig):
    """Direct preference optimisation against reference log-probs cached in the run dir."""

    kind: Literal["dpo"] = "dpo"
    """Direct preference optimisation."""
    variant: Literal["sigmoid", "ipo", "hinge", "robust"] = losses.DPO.variant
    """The DPO-family objective (see the trainer's ``dpo`` loss)."""
    beta: float = Field(losses.DPO.beta, gt=0, le=1000)
    """Temperature β of the implicit reward."""
    label_smoothing: float = Field(losses.DPO.label_smoothing, ge=0, lt=0.5)
    """Label smoothing ε (conservative DPO for ``sigmoid``; ``robust`` uses it too)."""
    eval_samples: int = Field(1, ge=1)
    """With ``gold_scorer``: completions sampled per held-out prompt at each evaluation."""
    eval_max_new_tokens: int = Field(32, ge=1)
    """With ``gold_scorer``: most tokens of each sampled completion."""

    @model_validator(mode="after")
    def _sampling_needs_gold(self) -> DPOConfig:
        for name in ("eval_samples", "eval_max_new_tokens"):
            if name in self.model_fields_set and not self.gold_scorer:
                raise ValueError(f"{name} applies with gold_scorer only: DPO samples nothing "
                                 "else")  # fmt: skip
        return self


class RolloutConfig(_Strict):
    """How completions are sampled from the generation service."""

    prompts_per_round: int = Field(16, ge=1)
    """Prompts sampled each round."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens of each completion."""
    temperature: float = Field(1.0, ge=0.01, le=100)
    """Sampling temperature; the policy's log-probs are computed at the same one."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling's probability mass."""
    scorer: str = ""
    """The reward service's scorer; empty = its default."""
    chunk_prompts: int = Field(0, ge=0)
    """Prompts per generation request, to overlap the phases: the round's prompts go out in
    chunks of this many (spread over the replicas, each with its own seed), and each chunk is
    scored and gets its reference log-probs as soon as it is generated, while later chunks
    generate. 0: one request per replica, then scoring, then reference, one after another."""
    overlap: bool = True
    """With ``chunk_prompts``: score each chunk as soon as it is generated (true), or only
    once the whole round is generated (false: the same requests, one phase after another — the
    serial baseline, with bit-identical results in ``deterministic`` mode)."""

    @model_validator(mode="after")
    def _overlap_needs_chunks(self) -> RolloutConfig:
        if "overlap" in self.model_fields_set and not self.chunk_prompts:
            raise ValueError("overlap applies to chunked rounds only: set chunk_prompts too")
        return self


class WeightSyncConfig(_Strict):
    """How each round's weights reach the generation replicas (``PushWeights``)."""

    transport: Literal["stream", "shared_path", "collective"] = "stream"
    """``stream``: the weights go over gRPC to each replica. ``shared_path``: the trainer writes
    them once under ``shared_path`` on a volume the replicas mount, and they read them from
    there. ``collective``: the trainer listens at ``rendezvous`` and sends the tensors to each
    replica over a ``torch.distributed`` group of two made for the push (gRPC carries only the
    header, the version and the commit, so the swap stays atomic and versioned)."""
    shared_path: str = ""
    """With ``shared_path``: the directory to write to, inside the trainer's storage root and
    mounted by every replica at the same path."""
    rendezvous: str = ""
    """With ``collective``: HOST:PORT the trainer listens on for the replicas (port 0 = a free
    port each push); HOST must be the trainer's address as the replicas reach it."""
    bucket_bytes: int = Field(0, ge=0, le=512 << 20)
    """With ``collective``: most bytes sent at once; 0 = the trainer's default (256 MiB)."""

    @model_validator(mode="after")
    def _transport_fields(self) -> WeightSyncConfig:
        needs = {"shared_path": "shared_path", "collective": "rendezvous"}
        for transport, field in needs.items():
            given = bool(getattr(self, field))
            if given != (self.transport == transport):
                raise ValueError(f"{field} goes with transport: {transport} (and only with it)")
        if self.bucket_bytes and self.transport != "collective":
            raise ValueError("bucket_bytes applies to transport: collective only")
        return self


class _OnlineConfig(_GoldTracking, JobConfig):
    """What the online jobs (PPO, GRPO/RLOO) share: rounds of sampling and training."""

    weight_sync: WeightSyncConfig = WeightSyncConfig()
    """How the trainer pushes each round's weights to the generation replicas."""

    epochs: float | None = None
    """Not used by online jobs (refused when set): they run ``rounds`` rounds, capped by
    ``max_steps``, each with ``ppo_epochs`` / ``epochs_per_round`` passes over its samples."""
    eval_samples: int = Field(1, ge=1)
    """Completions sampled per held-out prompt when evaluating (``eval_every``): the reward
    service's score, KL to the reference and length, each with its standard error."""
    recompute_old_logprobs: bool | None = None
    """Whether the trainer recomputes the rollout's log-probs (a ``Forward``) for the loss's
    old log-probs, or the loss takes the generation service's (the behaviour policy's, which
    it returns with every sample). Unset: what the algorithm needs — recomputed when a round
    trains in several passes (``ppo_epochs`` / ``epochs_per_round`` > 1, or more rows than
    ``batch_size``), and for PPO, whose ``Forward`` computes the values anyway; a single
    on-policy pass takes the generator's. When both exist, their mismatch is logged each
    round (``logprob_mismatch/mean_abs``, ``/max``). The vllm engine's log-probs are taken
    after top-p/top-k filtering: with ``top_p`` < 1, recompute."""
    off_policy_steps: int = Field(0, ge=0, le=8)
    """K ≥ 1: off-policy rounds — the rollouts of the next K rounds are generated while the
    current round trains, by the weights version the replicas hold (round t samples with the
    weights of round t − K, the first rounds with the first weights), and each sample keeps
    the version that produced it; staleness (the trainer's version − the sample's, at most K)
    is logged as ``staleness/mean``, ``/max``. The loss weights each token by the truncated
    importance weight min(π_old / π_behaviour, ``is_cap``) with π_old the trainer's log-probs
    when it trains on the round (always recomputed) and π_behaviour the generator's
    (``is_weight/mean``, ``/max``, ``/clipped_fraction``). A checkpoint keeps the rollouts
    generated ahead (``rollouts/`` in the run directory), so a resumed run repeats the same
    rounds; ahead rollouts lost with the process are generated again. 0: synchronous rounds."""
    is_cap: float = Field(2.0, ge=1, le=1000)
    """C, the truncation of the importance weight of off-policy rounds (TRL's
    ``vllm_importance_sampling_cap``); only with ``off_policy_steps`` ≥ 1."""

    @model_validator(mode="after")
    def _no_epochs(self) -> _OnlineConfig:
        if "epochs" in self.model_fields_set:
            raise ValueError(
                "epochs does not apply to online jobs: they run `rounds` rounds (capped by "
                "max_steps), each with ppo_epochs / epochs_per_round passes over its samples"
            )
        return self

    @model_validator(mode="after")
    def _gold_is_another_scorer(self) -> _OnlineConfig:
        if self.gold_scorer and self.gold_scorer == self.rollout.scorer:
            raise ValueError(f"gold_scorer {self.gold_scorer!r} is the training scorer "
                             "(rollout.scorer): the gold must be another one")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _off_policy(self) -> _OnlineConfig:
        if not self.off_policy_steps:
            if "is_cap" in self.model_fields_set:
                raise ValueError(
                    "is_cap applies to off-policy rounds only: set off_policy_steps too"
                )
        elif self.recompute_old_logprobs is False:
            raise ValueError(
                "off_policy_steps needs recompute_old_logprobs (unset or true): the importance "
                "weight compares the trainer's log-probs with the generator's"
            )
        return self


class PPOConfig(_OnlineConfig):
    """PPO with a value head, per-token KL penalty and GAE (Ouyang et al. 2022's recipe)."""

    kind: Literal["ppo"] = "ppo"
    """Proximal policy optimisation with a value head."""
    rounds: int = Field(20, ge=1)
    """Rounds of sample → score → train → push (one step each)."""
    rollout: RolloutConfig = RolloutConfig()
    """How each round samples."""
    ppo_epochs: int = Field(2, ge=1)
    """Passes over a round's samples, in minibatches of ``batch_size`` rows."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount γ of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """λ of GAE."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator of the penalty (Schulman 2020)."""
    kl_coef: float = Field(0.05, ge=0)
    """β of the per-token KL penalty (the start value when ``adaptive_kl``)."""
    adaptive_kl: bool = False
    """Adapt β towards ``target_kl`` (Ziegler et al. 2019)."""
    target_kl: float = Field(6.0, gt=0)
    """The sequence KL the adaptive controller aims for."""
    kl_horizon: int = Field(10000, ge=1)
    """Samples over which the adaptive controller closes the gap."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that did not end with EOS."""
    reward_clip: float | None = Field(None, gt=0)
    """Clip scores to ±this; unset = no clipping."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the round."""
    clip_range: float = Field(losses.PPO.clip_range, gt=0, le=10)
    """ε of the clipped policy ratio."""
    value_clip_range: float = Field(losses.PPO.value_clip_range, gt=0, le=1000)
    """ε_v: how far the value may move from its rollout value."""
    vf_coef: float = Field(losses.PPO.vf_coef, ge=0, le=1000)
    """Weight of the value loss."""
    entropy_coef: float = Field(losses.PPO.entropy_coef, ge=0, le=1000)
    """Weight of the entropy bonus."""


class GRPOConfig(_OnlineConfig):
    """Critic-free policy gradient with group baselines: GRPO or RLOO."""

    kind: Literal["grpo"] = "grpo"
    """Group-baseline policy gradient (GRPO or RLOO)."""
    rounds: int = Field(20, ge=1)
    """Rounds of sample → score → train → push (one step each)."""
    rollout: RolloutConfig = RolloutConfig(prompts_per_round=4)
    """How each round samples."""
    group_size: int = Field(4, ge=2)
    """Completions sampled per prompt (the group)."""
    baseline: Literal["grpo", "rloo"] = "grpo"
    """``grpo``: (r − group mean) / group std; ``rloo``: r − mean of the group's others."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO's divisor: the group's std, the round's, or none (Dr. GRPO)."""
    epochs_per_round: int = Field(1, ge=1)
    """Passes over a round's samples."""
    kl_coef: float = Field(losses.PolicyGradient.kl_coef, ge=0, le=1000)
    """β of the k3 KL-to-reference term of the loss."""
    clip_range: float | None = Field(0.2, gt=0, le=10)
    """ε of the clipped ratio; unset = plain REINFORCE."""
    aggregation: Literal["token_mean", "sequence_mean"] = losses.PolicyGradient.aggregation
    """How token losses reduce: over all tokens, or per sequence then over sequences."""


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


CONFIGS: dict[str, type[JobConfig]] = {
    "sft": SFTConfig,
    "reward_model": RewardModelConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
}


def describe_config(kind: str) -> str:
    """Every field of the job config of ``kind`` (nested sections as ``section.field``), with
    its type, its default and its docstring: what ``alignd run --help-config KIND`` prints.

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in CONFIGS:
        raise ConfigError(f"unknown job kind {kind!r}; choose from {', '.join(CONFIGS)}")
    cls = CONFIGS[kind]
    lines = [f"{kind}: {(cls.__doc__ or '').strip()}", ""]
    lines += _describe_fields(cls, "")
    return "\n".join(lines)


def _describe_fields(cls: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel)\
            else next((a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)
                       and issubclass(a, BaseModel)), None)  # fmt: skip
        default = "required" if field.is_required() else f"default {_default(field)}"
        lines.append(f"{prefix}{name} ({_type_name(annotation)}, {default})")
        lines.append(f"    {' '.join((field.description or '').split())}")
        if nested is not None:
            lines += _describe_fields(nested, f"{prefix}{name}.")
    return lines


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("pathlib.", "")


def _default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "as below"
    return str(value) if isinstance(value, Path) else repr(value)
