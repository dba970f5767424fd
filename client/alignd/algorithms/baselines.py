"""Critic-free baselines: GRPO, RLOO and REINFORCE++ advantages.

Group layout: the G samples of one prompt are consecutive rows, so ``scores`` of shape (B,)
reshapes to (B / G, G) — the layout of TRL (``rewards.view(-1, num_generations)``) and
OpenRLHF (``reshape(-1, n_samples_per_prompt)``). Sequence advantages are (B,); spread them
over the completion tokens with :func:`broadcast_to_tokens` for the ``policy_gradient`` loss.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from alignd.algorithms.advantages import discounted_returns
from alignd.algorithms.masked import as_mask, masked_whiten
from alignd.algorithms.rewards import as_scores

ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")


def grouped(scores: ArrayLike, group_size: int) -> np.ndarray:
    """(B,) scores as (B / G, G) groups of consecutive rows.

    Raises:
        ValueError: G < 2 (a group needs another sample to compare with), or B is not a
            multiple of G, or a score is not finite.
    """
    scores = as_scores(scores)
    if not isinstance(group_size, int | np.integer) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if len(scores) == 0 or len(scores) % group_size:
        raise ValueError(
            f"got {len(scores)} scores, not a positive multiple of group_size {group_size}: "
            "each prompt needs exactly group_size consecutive samples"
        )
    return scores.reshape(-1, group_size)


def grpo_advantages(
    scores: ArrayLike,
    group_size: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> np.ndarray:
    """GRPO advantages (Shao et al. 2024, "DeepSeekMath", §4.1.2, outcome supervision):

        A_i = (r_i − mean(r_group)) / (std + eps)

    with ``scale_rewards`` as TRL's ``GRPOConfig.scale_rewards``: ``group`` divides by the
    group's std (the paper), ``batch`` by the std of all B scores, ``none`` not at all
    (Liu et al. 2025, "Dr. GRPO"). std is Bessel-corrected and eps = 1e-4, as TRL computes
    them (OpenRLHF's ``group_norm`` uses eps = 1e-9).

    Args:
        scores: (B,) sequence scores, G consecutive per prompt.
        group_size: G ≥ 2.
        scale_rewards: ``group``, ``batch`` or ``none``.
        eps: added to the std.

    Returns:
        (B,) advantages; a group whose scores are all equal gets 0.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    groups = grouped(scores, group_size)  # (B/G, G)
    centered = groups - groups.mean(axis=1, keepdims=True)  # (B/G, G)
    if scale_rewards == "group":
        centered = centered / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale_rewards == "batch":
        centered = centered / (groups.std(ddof=1) + eps)
    return centered.reshape(-1)


def rloo_advantages(
    scores: ArrayLike, group_size: int, normalize: bool = False, eps: float = 1e-4
) -> np.ndarray:
    """RLOO advantages (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024), each sample against the mean of the others in its group:

        A_i = r_i − 1/(G−1) · Σ_{j≠i} r_j

    as TRL and OpenRLHF compute it. ``normalize`` then whitens over the batch,
    ``(A − mean(A)) / (std(A) + eps)``, TRL's ``normalize_advantages``.

    Args:
        scores: (B,) sequence scores, G consecutive per prompt.
        group_size: G ≥ 2.
        normalize: whiten the advantages over the batch.
        eps: added to the std when normalising.

    Returns:
        (B,) advantages.
    """
    groups = grouped(scores, group_size)  # (B/G, G)
    baseline = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)  # (B/G, G)
    advantages = (groups - baseline).reshape(-1)  # (B,)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std(ddof=1) + eps)
    return advantages


def group_mean_baseline(scores: ArrayLike, group_size: int) -> np.ndarray:
    """(B,) ``r_i − mean(r_group)``: the REINFORCE++-baseline shaping of OpenRLHF
    (``reinforce_baseline``), applied to the scores before :func:`token_rewards`."""
    groups = grouped(scores, group_size)  # (B/G, G)
    return (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)


def reinforce_pp_advantages(
    rewards: ArrayLike, mask: ArrayLike, gamma: float = 1.0, eps: float = 1e-8
) -> np.ndarray:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++"): per-token returns, whitened over the
    whole batch instead of per prompt group,

        G_t = Σ_k γ^k r_{t+k},      A = (G − mean(G)) / sqrt(var(G) + eps)

    with mean and variance over every counted token of the batch. The variance is the biased
    one, as OpenRLHF computes it. For REINFORCE++-baseline pass scores through
    :func:`group_mean_baseline` before building the token rewards.

    Args:
        rewards: (B, T) per-token rewards (the KL-shaped rewards with the score on the last
            token, :func:`alignd.algorithms.rewards.token_rewards`).
        mask: (B, T) 0/1 mask.
        gamma: discount γ (OpenRLHF's default 1).
        eps: added to the variance.

    Returns:
        (B, T) advantages, 0 on padding.
    """
    returns = discounted_returns(rewards, mask, gamma)  # (B, T)
    return masked_whiten(returns, mask, shift_mean=True, unbiased=False, eps=eps)


def broadcast_to_tokens(advantages: ArrayLike, mask: ArrayLike) -> np.ndarray:
    """(B, T) per-token advantages: each row's (B,) sequence advantage on its counted tokens,
    0 on padding (GRPO and RLOO give every token of a completion the same advantage)."""
    advantages = as_scores(advantages, "advantages")  # (B,)
    mask_array = np.asarray(mask)
    if mask_array.ndim != 2:
        raise ValueError(f"mask must be (B, T), got shape {mask_array.shape}")
    mask = as_mask(mask_array, (len(advantages), mask_array.shape[1]))  # (B, T)
    return np.where(mask, advantages[:, None], 0.0)
