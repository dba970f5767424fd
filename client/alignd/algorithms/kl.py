"""Per-token KL estimators and the KL coefficient controllers of PPO-RLHF.

Estimators (Schulman 2020, "Approximating KL Divergence"), per sampled token, with
``log r = log π_ref − log π`` (the token was sampled from π, so E_π[k] ≈ KL(π ‖ π_ref)):

    k1 = −log r = log π − log π_ref          unbiased, high variance, can be negative
    k2 = ½ (log r)²                          biased, low variance, ≥ 0
    k3 = (r − 1) − log r                     unbiased, low variance, ≥ 0

TRL (``kl_estimator`` k1/k3) and OpenRLHF (k1/k2/k3) compute these same expressions.

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2):
a fixed β, or an adaptive β driven towards a target KL with a clipped proportional error,

    e = clip(KL / KL_target − 1, −0.2, 0.2),      β ← β · (1 + e · n_steps / horizon),

identical in TRL's and OpenRLHF's ``AdaptiveKLController`` (``update(current, n_steps)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from alignd.algorithms.masked import as_mask, as_tokens, masked_mean

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    mask: ArrayLike | None = None,
    estimator: KLEstimator = "k1",
    clamp: float | None = None,
) -> np.ndarray:
    """Per-token KL estimate between the sampling policy and the reference.

    Args:
        logprobs: (B, T) log π of the sampled tokens.
        ref_logprobs: (B, T) log π_ref of the same tokens.
        mask: optional (B, T) 0/1 mask; padding gets 0.
        estimator: ``k1``, ``k2`` or ``k3`` (see the module docstring).
        clamp: if set, ``log r`` is clipped to [−clamp, clamp] first (OpenRLHF clamps at 10
            for k3 so that one outlier token cannot overflow ``exp``).

    Returns:
        (B, T) float64 per-token estimates.

    Raises:
        ValueError: unknown estimator, mismatched shapes or a bad mask.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    logprobs = as_tokens(logprobs, "logprobs")  # (B, T)
    ref_logprobs = as_tokens(ref_logprobs, "ref_logprobs")  # (B, T)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs has shape {ref_logprobs.shape}, expected {logprobs.shape}")
    counted = np.ones(logprobs.shape, bool) if mask is None else as_mask(mask, logprobs.shape)
    log_r = np.where(counted, ref_logprobs - logprobs, 0.0)  # (B, T) log π_ref − log π
    if clamp is not None:
        log_r = np.clip(log_r, -clamp, clamp)
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * log_r**2
    else:
        kl = np.expm1(log_r) - log_r  # (r − 1) − log r, exact near r = 1
    return np.where(counted, kl, 0.0)


def sequence_kl(
    kl: ArrayLike, mask: ArrayLike, reduction: Literal["sum", "mean"] = "sum"
) -> np.ndarray:
    """(B,) per-sequence KL from (B, T) per-token estimates.

    ``sum`` is the KL of the whole completion (what TRL logs and feeds its adaptive
    controller: ``(kl * mask).sum(-1)`` averaged over the batch); ``mean`` is the per-token mean
    OpenRLHF logs and feeds to its controller. Average the result over the batch for
    :meth:`AdaptiveKLController.update`, and keep the target in the same unit.

    Raises:
        ValueError: unknown reduction; with ``mean``, a row without counted tokens.
    """
    kl = as_tokens(kl, "kl")  # (B, T)
    mask = as_mask(mask, kl.shape)  # (B, T)
    if reduction == "sum":
        return np.where(mask, kl, 0.0).sum(axis=1)
    if reduction == "mean":
        return masked_mean(kl, mask, axis=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


@dataclass
class FixedKLController:
    """A constant KL coefficient β (TRL/OpenRLHF ``FixedKLController``)."""

    value: float

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.value}")

    def update(self, current: float, n_steps: int) -> float:
        """Leaves β unchanged; returns it."""
        return self.value


@dataclass
class AdaptiveKLController:
    """β adapted towards a target KL (Ziegler et al. 2019, §2.2).

    Attributes:
        value: the current β (initially the initial coefficient; save it to resume).
        target: the KL to aim for, in the unit passed to :meth:`update`.
        horizon: how many samples it takes to move β by at most 20 % (e · n_steps / horizon).
    """

    value: float
    target: float
    horizon: float = 10000

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.value}")
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")

    def update(self, current: float, n_steps: int) -> float:
        """One update after a batch; returns the new β.

        Args:
            current: the batch's measured KL (e.g. the mean of :func:`sequence_kl`).
            n_steps: samples in the batch (TRL and OpenRLHF pass the rollout batch size).
        """
        error = float(np.clip(current / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    kl_coef: float, target: float | None = None, horizon: float = 10000
) -> KLController:
    """An adaptive controller when ``target`` is given, else a fixed one (OpenRLHF's rule)."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
