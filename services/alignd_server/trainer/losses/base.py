"""What every loss takes and returns, the masked reductions they share, and their input checks.

A loss reads the tensors it needs from :class:`LossInputs` through the ``require_*`` helpers,
which raise :class:`LossError` naming the missing or malformed field. Token tensors come back
with their padding positions set to zero, so whatever a caller leaves in the padding (zeros,
garbage, NaN) changes neither the loss nor its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignd_server.common.errors import InvalidArgument


class LossError(InvalidArgument):
    """A loss's input is missing or malformed; ``field`` names it, e.g. ``batch.mask``."""


@dataclass
class LossInputs:
    """One batch of per-token and per-sequence tensors, as the trainer hands them to a loss."""

    logprobs: torch.Tensor | None
    """(B, T) policy log π(token) at completion positions, right-padded with 0."""
    mask: torch.Tensor | None
    """(B, T) 1 on completion tokens that count, 0 on padding."""
    values: torch.Tensor | None = None
    """(B, T) value-head outputs at completion positions (PPO)."""
    entropy: torch.Tensor | None = None
    """(B, T) policy entropy at completion positions."""
    mean_logprobs: torch.Tensor | None = None
    """(B, T) mean over the vocabulary of log π (for label smoothing)."""
    rewards: torch.Tensor | None = None
    """(B,) sequence-classifier outputs (reward models)."""
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each (B, T), padded like ``logprobs``: ``old_logprobs``, ``ref_logprobs``,
    ``advantages``, ``returns``, ``old_values``."""
    sequence_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """``ref_logps`` (B,), ``labels`` (B,), ``kl_rows`` (B,), ``margins`` (P,)."""


@dataclass
class LossOutput:
    """A loss's value and what to log about it."""

    loss: torch.Tensor
    """Scalar, differentiable."""
    metrics: dict[str, float]
    num_tokens: int
    """Tokens (or sequences, for sequence losses) that counted."""
    units: float | None = None
    """How many items the loss is a mean over, when that is not ``num_tokens`` (rows for a
    sequence mean). Data parallelism weights each rank's loss by its share of the units, so
    the ranks together compute exactly the loss of the whole batch."""

    @property
    def weight(self) -> float:
        """The units of this loss's mean: ``units``, else ``num_tokens``."""
        return float(self.num_tokens if self.units is None else self.units)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1; masked positions contribute exactly 0, even if NaN.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 where a value counts, 0 elsewhere.
        dim: reduce over this dimension only; ``None`` sums everything.
    """
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 where nothing counts).

    Args:
        x: (B, T) values.
        mask: (B, T) 1 where a value counts, 0 elsewhere.
        dim: reduce over this dimension only; ``None`` averages over every counted position.
    """
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def sequence_logps(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) log π(completion) of each row: the sum of its counted token log-probabilities."""
    return masked_sum(logprobs, mask, dim=-1)


def token_count(mask: torch.Tensor) -> int:
    """How many positions of ``mask`` count."""
    return int(mask.bool().sum().item())


def require_policy(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, mask)``, both (B, T), with the padding of ``logprobs`` set to 0.

    Raises:
        LossError: either is missing, they are not 2-D tensors of the same shape, or the mask
            counts no token.
    """
    if inputs.logprobs is None:
        raise LossError("batch.logprobs", "is required by this loss")
    if inputs.mask is None:
        raise LossError("batch.mask", "is required by this loss")
    if inputs.logprobs.dim() != 2:
        raise LossError("batch.logprobs", f"must be (B, T), got {tuple(inputs.logprobs.shape)}")
    if inputs.mask.shape != inputs.logprobs.shape:
        raise LossError(
            "batch.mask",
            f"has shape {tuple(inputs.mask.shape)}, "
            f"batch.logprobs has {tuple(inputs.logprobs.shape)}",
        )
    if not bool(inputs.mask.bool().any()):
        raise LossError("batch.mask", "counts no token")
    return _zero_padding(inputs.logprobs, inputs.mask), inputs.mask


def require_like_logprobs(
    tensor: torch.Tensor | None, name: str, mask: torch.Tensor, *, finite: bool = False
) -> torch.Tensor:
    """A (B, T) tensor shaped like ``mask``, with its padding set to 0.

    Args:
        tensor: the tensor, or ``None`` if the caller did not send it.
        name: its field path for errors, e.g. ``batch.token_inputs["advantages"]``.
        mask: (B, T) the batch's mask.
        finite: also reject NaN or infinite values at counted positions.

    Raises:
        LossError: it is missing, has the wrong shape, or (with ``finite``) is not finite.
    """
    if tensor is None:
        raise LossError(name, "is required by this loss")
    if tensor.shape != mask.shape:
        raise LossError(
            name, f"has shape {tuple(tensor.shape)}, batch.mask has {tuple(mask.shape)}"
        )
    tensor = _zero_padding(tensor, mask)
    if finite and not bool(torch.isfinite(tensor).all()):
        raise LossError(name, "must be finite; it has NaN or inf at a counted position")
    return tensor


def require_token_input(
    inputs: LossInputs, key: str, mask: torch.Tensor, *, finite: bool = False
) -> torch.Tensor:
    """``inputs.token_inputs[key]``, (B, T), checked by :func:`require_like_logprobs`."""
    name = f'batch.token_inputs["{key}"]'
    return require_like_logprobs(inputs.token_inputs.get(key), name, mask, finite=finite)


def require_sequence_input(inputs: LossInputs, key: str, rows: int) -> torch.Tensor:
    """``inputs.sequence_inputs[key]``, checked to be 1-D with ``rows`` entries.

    Raises:
        LossError: it is missing or has another shape.
    """
    name = f'batch.sequence_inputs["{key}"]'
    tensor = inputs.sequence_inputs.get(key)
    if tensor is None:
        raise LossError(name, "is required by this loss")
    if tensor.shape != (rows,):
        raise LossError(name, f"must have shape ({rows},), got {tuple(tensor.shape)}")
    return tensor


def importance_weights(
    inputs: LossInputs, old_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance weights w = min(π_old / π_behaviour, C) per token, when the batch
    carries ``token_inputs["behaviour_logprobs"]`` (the log-probs of the policy that sampled
    the tokens: an older weights version on the generation service, or its numerics), else
    ``None``. Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (truncated importance sampling); TRL's ``vllm_importance_sampling_cap``.

    The weight is a constant of the gradient (no gradient flows through it). Metrics, over the
    counted tokens: ``is_weight/mean`` and ``is_weight/max`` of w, and
    ``is_weight/clipped_fraction``, the fraction where π_old / π_behaviour > C.

    Raises:
        LossError: ``behaviour_logprobs`` is malformed or not finite.
    """
    if "behaviour_logprobs" not in inputs.token_inputs:
        return None, {}
    behaviour = require_token_input(inputs, "behaviour_logprobs", mask, finite=True)  # (B, T)
    with torch.no_grad():
        ratio = torch.exp(old_logprobs.detach() - behaviour)  # (B, T)
        weights = torch.clamp(ratio, max=cap)  # (B, T)
        counted = mask.bool()
        metrics = {
            "is_weight/mean": float(masked_mean(weights, mask)),
            "is_weight/max": float(weights[counted].max()),
            "is_weight/clipped_fraction": float(masked_mean((ratio > cap).to(ratio), mask)),
        }
    return weights, metrics


def split_pairs(rows: int, name: str) -> int:
    """The number of pairs P in a batch of ``rows`` = 2P rows: chosen [0, P), rejected [P, 2P).

    Raises:
        LossError: ``rows`` is odd or zero.
    """
    if rows == 0 or rows % 2:
        raise LossError(
            name, f"has {rows} rows; a pairwise loss needs P chosen rows then P rejected rows"
        )
    return rows // 2


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))
