"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization"), computed as TRL's ``KTOTrainer`` does.

Each row is a completion with π its policy and ref its reference log-probability (summed over
counted tokens). Rows marked in ``kl_rows`` are mismatched prompt/completion pairs that only
set the reference point

    z = max(0, mean_{KL rows} (π − ref))          (detached: no gradient flows through z)

and every other row is desirable (``labels`` 1) or undesirable (``labels`` 0):

    desirable     L_c = 1 − σ(β·((π_c − ref_c) − z))
    undesirable   L_r = 1 − σ(β·(z − (π_r − ref_r)))
    loss = mean(concat(λ_D·L_c, λ_U·L_r))

With no KL rows in the batch, z = 0 (TRL's value when it skips the KL estimate).
"""

from __future__ import annotations

import torch

from alignd_server.trainer.losses.base import (
    LossError,
    LossInputs,
    LossOutput,
    require_policy,
    require_sequence_input,
    sequence_logps,
)
from alignd_server.trainer.losses.spec import CAUSAL_LM, POSITIVE, LossSpec, Param


def kto(
    inputs: LossInputs,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """The KTO loss, averaged over the batch's labelled (non-KL) rows.

    Args:
        inputs: needs ``logprobs`` and ``mask`` (B, T), and in ``sequence_inputs`` the (B,)
            tensors ``ref_logps`` (reference summed log-probabilities), ``labels`` (1 desirable,
            0 undesirable; ignored on KL rows) and ``kl_rows`` (1 on KL rows, else 0).
        beta: β > 0.
        desirable_weight: λ_D, the weight of desirable rows' losses.
        undesirable_weight: λ_U, the weight of undesirable rows' losses.

    Returns:
        The loss; metrics ``kl`` (z), ``rewards_chosen`` and ``rewards_rejected`` (means of
        β·(π − ref) over desirable and undesirable rows, 0 where there are none).
        ``num_tokens`` counts the labelled sequences.

    Raises:
        LossError: an input is missing or malformed, a label is not 0 or 1, or every row is a
            KL row.
    """
    logprobs, mask = require_policy(inputs)  # (B, T), (B, T)
    rows = logprobs.shape[0]
    policy = sequence_logps(logprobs, mask)  # (B,)
    ref = require_sequence_input(inputs, "ref_logps", rows).to(policy.dtype)  # (B,)
    labels = require_sequence_input(inputs, "labels", rows)  # (B,)
    kl_rows = require_sequence_input(inputs, "kl_rows", rows).bool()  # (B,)
    logratios = policy - ref  # (B,)

    if bool(kl_rows.any()):
        z = logratios[kl_rows].detach().mean().clamp(min=0)  # ()
    else:
        z = torch.zeros((), dtype=policy.dtype, device=policy.device)
    labelled = ~kl_rows
    if not bool(labelled.any()):
        raise LossError('batch.sequence_inputs["kl_rows"]', "marks every row; none is labelled")
    if not bool(((labels[labelled] == 0) | (labels[labelled] == 1)).all()):
        raise LossError('batch.sequence_inputs["labels"]', "must be 0 or 1 on non-KL rows")
    desirable = labelled & (labels == 1)  # (B,)
    undesirable = labelled & (labels == 0)  # (B,)

    chosen = logratios[desirable]  # (D,)
    rejected = logratios[undesirable]  # (U,)
    chosen_losses = 1 - torch.sigmoid(beta * (chosen - z))  # (D,)
    rejected_losses = 1 - torch.sigmoid(beta * (z - rejected))  # (U,)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return LossOutput(
        loss=losses.mean(),
        metrics={
            "kl": float(z),
            "rewards_chosen": _mean_or_zero(beta * chosen.detach()),
            "rewards_rejected": _mean_or_zero(beta * rejected.detach()),
        },
        num_tokens=int(labelled.sum().item()),
    )


def _mean_or_zero(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


SPEC = LossSpec(
    name="kto",
    field="kto",
    fn=kto,
    params=(
        Param("beta", 0.1, POSITIVE),
        Param("desirable_weight", 1.0, POSITIVE),
        Param("undesirable_weight", 1.0, POSITIVE),
    ),
    model=CAUSAL_LM,
    sequence_inputs=("ref_logps", "labels", "kl_rows"),
    replicated="kl_rows",
)
