"""Proximal policy optimisation with a clipped value loss (Schulman et al. 2017, "Proximal
Policy Optimization Algorithms"), in the token-level form TRL and OpenRLHF use for language
models.

Per counted token, with r = exp(log π − log π_old) the probability ratio, A the advantage,
R the return, V the value head, V_old the value at rollout time and ε, ε_v the clip ranges:

    L_pg = w·max(−A·r, −A·clip(r, 1−ε, 1+ε))
    V_c  = V_old + clip(V − V_old, −ε_v, ε_v)
    L_vf = ½·max((V − R)², (V_c − R)²)
    loss = mean(L_pg) + c_vf·mean(L_vf) − c_ent·mean(H)

where every mean is over all counted tokens of the batch and H is the policy entropy (the
entropy bonus is only computed when c_ent > 0). w is 1 unless the batch carries the behaviour
policy's log-probs (the generation service's, for tokens sampled by an older weights version in
off-policy rounds): then w = min(π_old / π_behaviour, C), truncated importance sampling (Yao et
al. 2025), a constant of the gradient that weights the policy term only.
"""

from __future__ import annotations

import torch

from alignd_server.trainer.losses.base import (
    LossInputs,
    LossOutput,
    importance_weights,
    masked_mean,
    require_like_logprobs,
    require_policy,
    require_token_input,
    token_count,
)
from alignd_server.trainer.losses.spec import (
    CLIP,
    COEFFICIENT,
    IS_CAP,
    POSITIVE,
    VALUE_MODEL,
    LossSpec,
    Param,
    Statistic,
)


def ppo(
    inputs: LossInputs,
    clip_range: float = 0.2,
    value_clip_range: float = 0.2,
    vf_coef: float = 0.1,
    entropy_coef: float = 0.0,
    is_cap: float = 2.0,
) -> LossOutput:
    """The PPO clipped policy loss plus the clipped value loss (and an entropy bonus).

    Args:
        inputs: needs ``logprobs``, ``mask`` and ``values`` (B, T), and in ``token_inputs``
            the (B, T) tensors ``old_logprobs``, ``advantages``, ``returns`` and
            ``old_values``; ``entropy`` (B, T) when ``entropy_coef > 0``; optional
            ``token_inputs["behaviour_logprobs"]`` (B, T), which turns the importance weight on.
        clip_range: ε, the policy ratio's clip range.
        value_clip_range: ε_v, how far the value may move from ``old_values``.
        vf_coef: c_vf, the weight of the value loss.
        entropy_coef: c_ent, the weight of the entropy bonus.
        is_cap: C, the truncation of the importance weight.

    Returns:
        The loss; metrics ``policy_loss``, ``value_loss`` (mean L_vf, before c_vf),
        ``clip_fraction`` (fraction of tokens where clipping changes the objective: the
        clipped term is the one the max selects, as TRL's PPO and GRPO and OpenRLHF count it),
        ``ratio_outside_fraction`` (fraction with |r − 1| > ε, whichever term wins),
        ``approx_kl`` (½·mean((log π − log π_old)²)), ``value_clip_fraction`` (fraction of
        tokens where the clipped value term is the larger — V outside V_old ± ε_v and the
        clip raising the loss), ``entropy`` (when given) and, with
        ``behaviour_logprobs``, ``is_weight/mean``, ``/max`` and ``/clipped_fraction``.

    Raises:
        LossError: a needed input is missing or malformed, or advantages or returns are not
            finite.
    """
    logprobs, mask = require_policy(inputs)  # (B, T), (B, T)
    old_logprobs = require_token_input(inputs, "old_logprobs", mask)  # (B, T)
    advantages = require_token_input(inputs, "advantages", mask, finite=True)  # (B, T)
    returns = require_token_input(inputs, "returns", mask, finite=True)  # (B, T)
    old_values = require_token_input(inputs, "old_values", mask)  # (B, T)
    values = require_like_logprobs(inputs.values, "batch.values", mask)  # (B, T)

    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_unclipped = -advantages * ratio  # (B, T)
    pg_clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)  # (B, T)
    pg_losses = torch.max(pg_unclipped, pg_clipped)  # (B, T)
    weights, is_metrics = importance_weights(inputs, old_logprobs, mask, is_cap)
    if weights is not None:
        pg_losses = weights * pg_losses
    policy_loss = masked_mean(pg_losses, mask)

    # V clamped to [V_old − ε_v, V_old + ε_v] itself (inside, exactly V: no rounding of
    # V_old + (V − V_old) makes an unclipped token look clipped).
    clipped_values = torch.clamp(
        values, old_values - value_clip_range, old_values + value_clip_range
    )  # (B, T)
    vf_unclipped = (values - returns) ** 2  # (B, T)
    vf_clipped = (clipped_values - returns) ** 2  # (B, T)
    value_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)
    loss = policy_loss + vf_coef * value_loss

    metrics: dict[str, float] = dict(is_metrics)
    if entropy_coef > 0 or inputs.entropy is not None:
        entropy = masked_mean(require_like_logprobs(inputs.entropy, "batch.entropy", mask), mask)
        metrics["entropy"] = float(entropy.detach())
        if entropy_coef > 0:
            loss = loss - entropy_coef * entropy

    with torch.no_grad():
        metrics.update(
            policy_loss=float(policy_loss),
            value_loss=float(value_loss),
            clip_fraction=float(masked_mean((pg_clipped > pg_unclipped).to(ratio), mask)),
            ratio_outside_fraction=float(
                masked_mean(((ratio - 1).abs() > clip_range).to(ratio), mask)
            ),
            approx_kl=float(0.5 * masked_mean(log_ratio**2, mask)),
            value_clip_fraction=float(masked_mean((vf_clipped > vf_unclipped).to(ratio), mask)),
        )
    return LossOutput(loss=loss, metrics=metrics, num_tokens=token_count(mask))


SPEC = LossSpec(
    name="ppo",
    field="ppo",
    fn=ppo,
    params=(
        Param("clip_range", 0.2, CLIP),
        Param("value_clip_range", 0.2, POSITIVE),
        Param("vf_coef", 0.1, COEFFICIENT),
        Param("entropy_coef", 0.0, COEFFICIENT),
        Param("is_cap", 2.0, IS_CAP),
    ),
    model=VALUE_MODEL,
    statistics=(Statistic("values"), Statistic("entropy", when="entropy_coef")),
    token_inputs=("old_logprobs", "advantages", "returns", "old_values", "behaviour_logprobs"),
    temperature=True,
)
