"""Advantages and returns over right-padded token sequences: GAE, discounted returns, whitening.

Layout: (B, T) float arrays with a (B, T) 0/1 mask (see :mod:`alignd.algorithms.masked`).
Rewards and values under a 0 are treated as 0 — OpenRLHF's ``action_mask * values`` — so
for right-padded rows the recursion sees each completion end exactly where its tokens end
(the value after the last token is 0: the episode terminates). TRL zeroes the same positions
before its loop. Outputs are 0 on padding.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from alignd.algorithms.masked import as_mask, as_tokens, masked_whiten

__all__ = ["discounted_returns", "gae", "masked_whiten", "whiten_advantages"]


def _check_discount(gamma: float, lam: float = 1.0) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def gae(
    rewards: ArrayLike,
    values: ArrayLike,
    mask: ArrayLike,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16), backwards over each row:

        δ_t = r_t + γ · V_{t+1} − V_t            (V_T = 0 after the last token)
        A_t = δ_t + γ · λ · A_{t+1}
        R_t = A_t + V_t                          (the value targets, "returns")

    Defaults γ = 1, λ = 0.95 are TRL's and OpenRLHF's.

    Args:
        rewards: (B, T) per-token rewards (:func:`alignd.algorithms.rewards.token_rewards`).
        values: (B, T) value estimates V_t of the state before token t.
        mask: (B, T) 0/1 completion mask, right-padded.
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].

    Returns:
        ``(advantages, returns)``, each (B, T), 0 on padding. Whiten the advantages after
        (:func:`whiten_advantages`), not the returns.
    """
    _check_discount(gamma, lam)
    rewards = as_tokens(rewards, "rewards")  # (B, T)
    values = as_tokens(values, "values")  # (B, T)
    if values.shape != rewards.shape:
        raise ValueError(f"values has shape {values.shape}, expected {rewards.shape}")
    mask = as_mask(mask, rewards.shape)  # (B, T)
    rewards = np.where(mask, rewards, 0.0)
    values = np.where(mask, values, 0.0)
    advantages = np.zeros_like(rewards)  # (B, T)
    running = np.zeros(rewards.shape[0])  # (B,) A_{t+1}
    next_values = np.zeros(rewards.shape[0])  # (B,) V_{t+1}
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_values = values[:, t]
    advantages = np.where(mask, advantages, 0.0)
    return advantages, np.where(mask, advantages + values, 0.0)


def discounted_returns(rewards: ArrayLike, mask: ArrayLike, gamma: float = 1.0) -> np.ndarray:
    """Reward-to-go G_t = Σ_{k≥0} γ^k r_{t+k} of each token (REINFORCE; OpenRLHF's
    ``get_cumulative_returns``).

    Args:
        rewards: (B, T) per-token rewards.
        mask: (B, T) 0/1 mask.
        gamma: discount γ in [0, 1].

    Returns:
        (B, T) returns, 0 on padding.
    """
    _check_discount(gamma)
    rewards = as_tokens(rewards, "rewards")  # (B, T)
    mask = as_mask(mask, rewards.shape)  # (B, T)
    rewards = np.where(mask, rewards, 0.0)
    returns = np.zeros_like(rewards)  # (B, T)
    running = np.zeros(rewards.shape[0])  # (B,) G_{t+1}
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return np.where(mask, returns, 0.0)


def whiten_advantages(advantages: ArrayLike, mask: ArrayLike) -> np.ndarray:
    """(B, T) advantages whitened over every counted token of the batch, as TRL's PPO does
    (``masked_whiten(advantages, mask)``: shift the mean, unbiased variance), 0 on padding."""
    return masked_whiten(advantages, mask, shift_mean=True)
