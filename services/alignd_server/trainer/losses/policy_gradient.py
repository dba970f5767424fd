"""Critic-free policy gradient for GRPO, RLOO and REINFORCE++, with optional clipping and a
k3 KL penalty.

Per counted token, with A the advantage (estimated outside the loss: group-normalised for GRPO,
leave-one-out for RLOO, batch-normalised for REINFORCE++) and r the probability ratio:

    r   = exp(log π − log π_old)       with ``old_logprobs``;
          exp(log π − sg(log π))        without (value 1, gradient ∇log π: plain REINFORCE)
    L   = −A·r                          or, with clip range ε,
          max(−A·r, −A·clip(r, 1−ε, 1+ε))           (Schulman et al. 2017)
    k3  = exp(ref − log π) − (ref − log π) − 1       (Schulman 2020, "Approximating KL
                                                       Divergence"; Shao et al. 2024, GRPO)
    ℓ   = w·L + β·k3

reduced by ``token_mean`` (the mean of ℓ over every counted token of the batch) or by
``sequence_mean`` (the mean over rows of each row's mean, as in Shao et al. 2024,
"DeepSeekMath"; rows without counted tokens are left out). w is 1 unless the batch carries the
behaviour policy's log-probs (the generation service's, for tokens sampled by an older weights
version in off-policy rounds): then w = min(π_old / π_behaviour, C), truncated importance
sampling (Yao et al. 2025; TRL GRPO's ``vllm_importance_sampling_correction``, which also
leaves the KL term unweighted), a constant of the gradient; it needs ``old_logprobs``.
"""

from __future__ import annotations

from typing import Literal

import torch

from alignd_server.trainer.losses.base import (
    LossError,
    LossInputs,
    LossOutput,
    importance_weights,
    masked_mean,
    require_policy,
    require_token_input,
    token_count,
)
from alignd_server.trainer.losses.spec import (
    CAUSAL_LM,
    CLIP,
    COEFFICIENT,
    IS_CAP,
    LossSpec,
    Param,
)

Aggregation = Literal["token_mean", "sequence_mean"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "sequence_mean")


def policy_gradient(
    inputs: LossInputs,
    clip_range: float | None = None,
    kl_coef: float = 0.0,
    aggregation: Aggregation = "token_mean",
    is_cap: float = 2.0,
) -> LossOutput:
    """The (optionally clipped) policy-gradient loss plus β·k3, reduced by ``aggregation``.

    Args:
        inputs: needs ``logprobs``, ``mask`` and ``token_inputs["advantages"]`` (B, T);
            optional ``token_inputs["old_logprobs"]``; ``token_inputs["ref_logprobs"]`` when
            ``kl_coef > 0`` (if given with ``kl_coef == 0`` it is only logged); optional
            ``token_inputs["behaviour_logprobs"]``, with ``old_logprobs``, which turns the
            importance weight on.
        clip_range: ε; ``None`` leaves the ratio unclipped.
        kl_coef: β, the weight of the k3 penalty.
        aggregation: ``token_mean`` or ``sequence_mean``.
        is_cap: C, the truncation of the importance weight.

    Returns:
        The loss; metrics ``policy_loss`` (the reduced L, without the penalty), ``kl`` (the
        token mean of k3, when ``ref_logprobs`` is given), ``clip_fraction`` (when clipping:
        fraction of tokens where the clipped term is the one the max selects, as TRL and
        OpenRLHF count it) and ``ratio_outside_fraction`` (fraction with |r − 1| > ε) and, with
        ``behaviour_logprobs``,
        ``is_weight/mean``, ``/max`` and ``/clipped_fraction``.

    Raises:
        LossError: a needed input is missing or malformed, or advantages are not finite.
        ValueError: an unknown aggregation.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be token_mean or sequence_mean, got {aggregation!r}")
    logprobs, mask = require_policy(inputs)  # (B, T), (B, T)
    advantages = require_token_input(inputs, "advantages", mask, finite=True)  # (B, T)
    if "old_logprobs" in inputs.token_inputs:
        old_logprobs = require_token_input(inputs, "old_logprobs", mask)  # (B, T)
    elif "behaviour_logprobs" in inputs.token_inputs:
        raise LossError(
            'batch.token_inputs["old_logprobs"]',
            "is required with behaviour_logprobs (the importance weight is π_old / π_behaviour)",
        )
    else:
        old_logprobs = logprobs.detach()
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)

    pg_unclipped = -advantages * ratio  # (B, T)
    pg_losses = pg_unclipped
    if clip_range is not None:
        pg_clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)  # (B, T)
        pg_losses = torch.max(pg_unclipped, pg_clipped)
    weights, is_metrics = importance_weights(inputs, old_logprobs, mask, is_cap)
    if weights is not None:
        pg_losses = weights * pg_losses
    per_token = pg_losses  # (B, T)

    k3 = None
    if kl_coef > 0 or "ref_logprobs" in inputs.token_inputs:
        ref_logprobs = require_token_input(inputs, "ref_logprobs", mask)  # (B, T)
        log_ratio = ref_logprobs - logprobs  # (B, T)
        k3 = torch.exp(log_ratio) - log_ratio - 1  # (B, T)
        if kl_coef > 0:
            per_token = per_token + kl_coef * k3

    metrics: dict[str, float] = dict(is_metrics)
    with torch.no_grad():
        metrics["policy_loss"] = float(_reduce(pg_losses, mask, aggregation))
        if k3 is not None:
            metrics["kl"] = float(masked_mean(k3, mask))
        if clip_range is not None:
            selected = (pg_clipped > pg_unclipped).to(ratio)  # clipping changes the objective
            metrics["clip_fraction"] = float(masked_mean(selected, mask))
            outside = ((ratio - 1).abs() > clip_range).to(ratio)
            metrics["ratio_outside_fraction"] = float(masked_mean(outside, mask))
    return LossOutput(
        loss=_reduce(per_token, mask, aggregation),
        metrics=metrics,
        num_tokens=token_count(mask),
        units=int(mask.bool().any(-1).sum()) if aggregation == "sequence_mean" else None,
    )


def _reduce(x: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Scalar ``token_mean`` or ``sequence_mean`` of (B, T) ``x`` over the counted tokens."""
    if aggregation == "token_mean":
        return masked_mean(x, mask)
    rows = mask.bool().any(-1)  # (B,)
    return masked_mean(x, mask, dim=-1)[rows].mean()


SPEC = LossSpec(
    name="policy_gradient",
    field="policy_gradient",
    fn=policy_gradient,
    params=(
        Param("aggregation", "token_mean", choices=AGGREGATIONS),
        Param("clip_range", None, CLIP),
        Param("kl_coef", 0.0, COEFFICIENT),
        Param("is_cap", 2.0, IS_CAP),
    ),
    model=CAUSAL_LM,
    token_inputs=("advantages", "old_logprobs", "ref_logprobs", "behaviour_logprobs"),
    temperature=True,
)
