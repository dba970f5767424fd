"""Sequence scores to PPO per-token rewards: EOS penalty, normalisation, clipping, KL shaping.

The usual order for one PPO batch (TRL and OpenRLHF agree on it):

1. ``scores = penalize_missing_eos(scores, ended_with_eos, penalty)``
2. ``scores = moments.normalize(scores)`` and/or ``clip_scores(scores, ...)``
3. ``kl = kl_penalty(logprobs, ref_logprobs, mask, "k1")``
4. ``rewards = token_rewards(scores, kl, mask, kl_coef)``, optionally
   ``whiten_rewards(rewards, mask)``
5. ``advantages.gae(rewards, values, mask, ...)``

Scores are (B,) arrays, per-token arrays (B, T) right-padded with a mask (see
:mod:`alignd.algorithms.masked`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from alignd.algorithms.masked import as_mask, as_tokens, lengths, masked_whiten


def as_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """``scores`` as a (B,) float64 array of finite values; raises ValueError otherwise."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (B,), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array[~np.isfinite(array)][:3]}")
    return array


def penalize_missing_eos(
    scores: ArrayLike,
    ended_with_eos: ArrayLike,
    penalty: float,
    mode: Literal["subtract", "replace"] = "subtract",
) -> np.ndarray:
    """Penalises completions that did not end with the end token (cut off by the length cap).

    ``subtract``: ``score − penalty`` (TRL's ``missing_eos_penalty``); ``replace``: the score
    becomes ``penalty`` (TRL's earlier ``non_eos_penalty`` with ``penalty_reward_value``, e.g.
    −1). Both push the policy towards finishing within the token budget.

    Args:
        scores: (B,) sequence scores.
        ended_with_eos: (B,) bool, True where the completion's finish reason is ``eos``.
        penalty: the amount subtracted, or the replacement score.
        mode: ``subtract`` or ``replace``.

    Returns:
        (B,) penalised scores.
    """
    scores = as_scores(scores)
    ended = as_mask(ended_with_eos, scores.shape, "ended_with_eos")  # (B,)
    if mode == "subtract":
        return np.where(ended, scores, scores - penalty)
    if mode == "replace":
        return np.where(ended, scores, penalty)
    raise ValueError(f"mode must be 'subtract' or 'replace', got {mode!r}")


def clip_scores(scores: ArrayLike, clip: float | tuple[float, float]) -> np.ndarray:
    """(B,) scores clipped to [−clip, clip] (TRL's ``score_clip``) or to a (low, high) range
    (OpenRLHF's ``reward_clip_range``)."""
    low, high = (-clip, clip) if isinstance(clip, int | float) else clip
    if low > high:
        raise ValueError(f"clip range must have low <= high, got ({low}, {high})")
    return np.clip(as_scores(scores), low, high)


@dataclass
class RunningMoments:
    """Running mean and standard deviation of every score seen (TRL's ``RunningMoments``).

    Batches are merged exactly (Chan et al. 1979, the parallel form of Welford's algorithm):
    after batches x⁽¹⁾ … x⁽ᵏ⁾ the moments are those of their concatenation. ``std`` is the
    Bessel-corrected standard deviation. Save ``mean``, ``var`` and ``count`` to resume.

    Attributes:
        mean: running mean.
        var: running population variance (divided by ``count``).
        count: scores seen.
    """

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen (1.0 before two scores)."""
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, scores: ArrayLike) -> tuple[float, float]:
        """Merges a batch; returns the batch's own (mean, unbiased std)."""
        batch = as_scores(scores)  # (B,)
        n = len(batch)
        if n == 0:
            raise ValueError("RunningMoments.update needs at least one score")
        batch_mean, batch_var = float(batch.mean()), float(batch.var())
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean += delta * n / total
            self.var, self.count = m2 / total, total
        return batch_mean, math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0

    def normalize(self, scores: ArrayLike, shift_mean: bool = True) -> np.ndarray:
        """Updates with ``scores``, then returns ``(s − mean) / std`` (``s / std`` without
        ``shift_mean``), TRL's ``use_score_norm`` / ``use_score_scaling``. TRL adds the float
        epsilon to std; here std is floored at 1e-8 instead."""
        scores = as_scores(scores)
        self.update(scores)
        std = max(self.std, 1e-8)
        return (scores - self.mean) / std if shift_mean else scores / std


def token_rewards(scores: ArrayLike, kl: ArrayLike, mask: ArrayLike, kl_coef: float) -> np.ndarray:
    """Per-token PPO rewards: a KL penalty on every token, the score on the last one.

    Ziegler et al. 2019 (eq. 2) and Stiennon et al. 2020, per token t of sample i:

        R[i, t] = −β · KL[i, t] + score[i] · [t = last counted token of i]

    as TRL (``rewards[actual_end] += scores``) and OpenRLHF (``compute_reward``) build them.

    Args:
        scores: (B,) sequence scores (after penalties, normalisation, clipping).
        kl: (B, T) per-token KL estimates (:func:`alignd.algorithms.kl.kl_penalty`).
        mask: (B, T) 0/1 mask of completion tokens.
        kl_coef: β ≥ 0.

    Returns:
        (B, T) rewards, 0 on padding.

    Raises:
        ValueError: shapes disagree, β < 0, or a row has no counted token to put its score on.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    kl = as_tokens(kl, "kl")  # (B, T)
    mask = as_mask(mask, kl.shape)  # (B, T)
    scores = as_scores(scores)  # (B,)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"scores has shape {scores.shape}, expected ({kl.shape[0]},)")
    ends = lengths(mask)  # (B,)
    if np.any(ends == 0):
        raise ValueError(f"rows {np.flatnonzero(ends == 0).tolist()} have no counted token")
    rewards = np.where(mask, -kl_coef * kl, 0.0)  # (B, T)
    rewards[np.arange(len(scores)), ends - 1] += scores
    return rewards


def whiten_rewards(rewards: ArrayLike, mask: ArrayLike) -> np.ndarray:
    """(B, T) rewards scaled to unit variance over the batch, mean kept (TRL's
    ``whiten_rewards``: ``masked_whiten(rewards, mask, shift_mean=False)``), 0 on padding."""
    return masked_whiten(rewards, mask, shift_mean=False)
