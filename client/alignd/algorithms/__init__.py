"""RLHF math that needs no gradients, in numpy: KL estimators and controllers, PPO reward
shaping, GAE, whitening and the critic-free baselines (GRPO, RLOO, REINFORCE++).

Conventions: sequence quantities are (B,) arrays; per-token quantities are (B, T) float
arrays right-padded with a (B, T) 0/1 mask (TRL's and OpenRLHF's layout), converted from and
to the clients' ragged rows with :func:`pad_right` and :func:`unpad`. Padding is ignored on
input and 0 on output; results are float64. Groups of samples of one prompt are consecutive.
"""

from alignd.algorithms.advantages import discounted_returns, gae, whiten_advantages
from alignd.algorithms.baselines import (
    broadcast_to_tokens,
    group_mean_baseline,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from alignd.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    kl_penalty,
    make_kl_controller,
    sequence_kl,
)
from alignd.algorithms.masked import (
    lengths,
    masked_mean,
    masked_var,
    masked_whiten,
    pad_right,
    unpad,
)
from alignd.algorithms.rewards import (
    RunningMoments,
    clip_scores,
    penalize_missing_eos,
    token_rewards,
    whiten_rewards,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "RunningMoments",
    "broadcast_to_tokens",
    "clip_scores",
    "discounted_returns",
    "gae",
    "group_mean_baseline",
    "grpo_advantages",
    "kl_penalty",
    "lengths",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "pad_right",
    "penalize_missing_eos",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_kl",
    "token_rewards",
    "unpad",
    "whiten_advantages",
    "whiten_rewards",
]
