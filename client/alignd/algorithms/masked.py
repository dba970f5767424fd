"""Ragged ↔ padded conversion and masked statistics, the layout every algorithm here uses.

Convention: per-token quantities are ``(B, T)`` float arrays, right-padded, with a ``(B, T)``
mask that is 1 (or True) on the tokens that count and 0 on padding — the layout of TRL and
OpenRLHF, and of the trainer's ``token_inputs``. The SDK's clients speak ragged rows (one 1-D
array per sample); :func:`pad_right` and :func:`unpad` convert. Values under a 0 in the mask
are ignored, even NaN, and every per-token output is exactly 0 there. Arithmetic is float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def as_mask(mask: ArrayLike, shape: tuple[int, ...], name: str = "mask") -> np.ndarray:
    """Checks a 0/1 (or bool) mask against ``shape`` and returns it as bool.

    Raises:
        ValueError: the shape differs or a value is neither 0 nor 1.
    """
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 or booleans")
    return array.astype(bool)


def as_tokens(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a (B, T) float64 array; raises ValueError naming it if not 2-D."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be (B, T), got shape {array.shape}")
    return array


def pad_right(rows: Sequence[ArrayLike], value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Stacks ragged 1-D rows into a right-padded array and its mask.

    Args:
        rows: B 1-D arrays of lengths T_i.
        value: fill for the padding.

    Returns:
        ``(values, mask)``: (B, max T_i) float64 values and (B, max T_i) bool mask.

    Raises:
        ValueError: a row is not 1-D.
    """
    arrays = [np.asarray(row, dtype=np.float64) for row in rows]
    for i, array in enumerate(arrays):
        if array.ndim != 1:
            raise ValueError(f"rows[{i}] must be 1-D, got shape {array.shape}")
    width = max((len(a) for a in arrays), default=0)
    values = np.full((len(arrays), width), value, dtype=np.float64)  # (B, T)
    mask = np.zeros((len(arrays), width), dtype=bool)  # (B, T)
    for i, array in enumerate(arrays):
        values[i, : len(array)] = array
        mask[i, : len(array)] = True
    return values, mask


def lengths(mask: ArrayLike) -> np.ndarray:
    """(B,) int: one past the last counted token of each row (0 for an empty row)."""
    mask = np.asarray(mask).astype(bool)  # (B, T)
    width = mask.shape[1]
    if width == 0:
        return np.zeros(mask.shape[0], dtype=np.int64)
    last = width - 1 - np.argmax(mask[:, ::-1], axis=1)  # (B,) index of the last True
    return np.where(mask.any(axis=1), last + 1, 0)


def unpad(values: ArrayLike, mask: ArrayLike) -> list[np.ndarray]:
    """Inverse of :func:`pad_right`: row i is ``values[i, :n_i]``, n_i from :func:`lengths`.

    Zeros inside a row's mask (a hole) are kept, so rows stay aligned with their tokens.
    """
    values = as_tokens(values, "values")  # (B, T)
    return [values[i, :n].copy() for i, n in enumerate(lengths(as_mask(mask, values.shape)))]


def masked_mean(values: ArrayLike, mask: ArrayLike, axis: int | None = None) -> np.ndarray:
    """Mean of ``values`` over the counted positions (all of them, or along ``axis``).

    Raises:
        ValueError: nothing is counted (along ``axis``: some row counts nothing).
    """
    values = np.asarray(values, dtype=np.float64)
    mask = as_mask(mask, values.shape)
    count = mask.sum(axis=axis)
    if np.any(count == 0):
        raise ValueError("masked_mean: the mask selects no element")
    return np.where(mask, values, 0.0).sum(axis=axis) / count


def masked_var(values: ArrayLike, mask: ArrayLike, unbiased: bool = True) -> float:
    """Variance of the counted ``values``; with ``unbiased``, Bessel's n/(n−1) as TRL applies.

    Raises:
        ValueError: fewer than 2 counted values with ``unbiased``, or none without.
    """
    values = np.asarray(values, dtype=np.float64)
    mask = as_mask(mask, values.shape)
    count = int(mask.sum())
    if unbiased and count < 2:
        raise ValueError(f"masked_var: unbiased variance needs 2 or more elements, got {count}")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return float(variance * count / (count - 1)) if unbiased else float(variance)


def masked_whiten(
    values: ArrayLike,
    mask: ArrayLike,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> np.ndarray:
    """Whitens the counted values with one mean and variance over the whole batch.

    ``w = (x − μ) / sqrt(σ² + eps)``, and with ``shift_mean=False`` the mean is added back
    (``w + μ``: only the scale changes), as TRL's ``masked_whiten`` does for PPO rewards.
    μ and σ² are taken over every counted element of the batch (TRL; σ² unbiased by default).
    OpenRLHF's advantage normalisation uses the biased σ² and ``rsqrt(max(σ², eps))``; pass
    ``unbiased=False`` for its variance (the eps forms differ only when σ² ≈ eps).

    Args:
        values: (B, T) values.
        mask: (B, T) 0/1 mask.
        shift_mean: subtract the mean (True) or keep it (False).
        unbiased: Bessel-corrected variance.
        eps: added to the variance.

    Returns:
        (B, T) whitened values, 0 on padding.
    """
    values = as_tokens(values, "values")  # (B, T)
    mask = as_mask(mask, values.shape)  # (B, T)
    mean = float(masked_mean(values, mask))
    variance = masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) / np.sqrt(variance + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return np.where(mask, whitened, 0.0)
