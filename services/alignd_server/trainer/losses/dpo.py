"""Direct preference optimisation and its sigmoid, IPO, hinge and robust variants.

Rows [0, P) of the batch are chosen completions, rows [P, 2P) their rejected counterparts.
With π the policy's and ref the reference model's log-probability of a completion (the sum over
its counted tokens), the implicit reward margin of a pair is

    h = (π_c − ref_c) − (π_r − ref_r)

and the loss is the mean over pairs of, with β the temperature and ε the label smoothing:

    sigmoid  −log σ(βh)·(1−ε) − log σ(−βh)·ε                Rafailov et al. 2023, "Direct
             (ε = 0 is plain DPO; ε > 0 is conservative DPO,  Preference Optimization"
             Mitchell 2023, as OpenRLHF and TRL ≤ 0.11 compute it; TRL 1.16's sigmoid loss
             ignores label_smoothing, so it matches TRL 1.16 at ε = 0 only)
    ipo      (h' − 1/(2β))²                                 Azar et al. 2023, "A General
                                                             Theoretical Paradigm ..." (IPO)
    hinge    max(0, 1 − βh)                                 Zhao et al. 2023, "SLiC-HF"
    robust   (−log σ(βh)·(1−ε) + log σ(−βh)·ε) / (1−2ε)     Chowdhury et al. 2024, "Provably
                                                             Robust DPO" (TRL's formula)

For ``ipo``, h' uses per-token averaged log-ratios, TRL's convention: every row's policy and
reference log-probabilities are divided by that row's number of counted tokens, so
h' = (π_c − ref_c)/n_c − (π_r − ref_r)/n_r. The logged rewards and log-probabilities of an
``ipo`` batch are these averaged values too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from alignd_server.trainer.losses.base import (
    LossError,
    LossInputs,
    LossOutput,
    require_policy,
    require_sequence_input,
    sequence_logps,
    split_pairs,
)
from alignd_server.trainer.losses.spec import BELOW_HALF, CAUSAL_LM, POSITIVE, LossSpec, Param

DpoVariant = Literal["sigmoid", "ipo", "hinge", "robust"]
VARIANTS: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")


def dpo(
    inputs: LossInputs,
    variant: DpoVariant = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """The DPO-family loss of ``variant``, averaged over the batch's pairs.

    Args:
        inputs: needs ``logprobs`` and ``mask`` (2P, T), chosen rows then rejected rows, and
            ``sequence_inputs["ref_logps"]`` (2P,), the reference's summed log-probabilities.
        variant: ``sigmoid``, ``ipo``, ``hinge`` or ``robust``.
        beta: β > 0.
        label_smoothing: ε in [0, 0.5), used by ``sigmoid`` and ``robust`` only.

    Returns:
        The loss; metrics ``rewards_chosen`` (mean β(π_c − ref_c)), ``rewards_rejected``,
        ``margin`` (mean of their difference), ``accuracy`` (fraction of pairs whose chosen
        reward is higher), ``logps_chosen`` and ``logps_rejected`` (mean policy π).
        ``num_tokens`` counts sequences (2P).

    Raises:
        LossError: an input is missing or malformed, the batch has an odd number of rows, or
            (``ipo``) a row has no counted tokens.
        ValueError: an unknown variant, β ≤ 0, or ε outside [0, 0.5).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logprobs, mask = require_policy(inputs)  # (2P, T), (2P, T)
    pairs = split_pairs(logprobs.shape[0], "batch.logprobs")
    policy = sequence_logps(logprobs, mask)  # (2P,)
    ref = require_sequence_input(inputs, "ref_logps", 2 * pairs).to(policy.dtype)  # (2P,)
    if variant == "ipo":
        counts = mask.to(policy.dtype).sum(-1)  # (2P,)
        if bool((counts == 0).any()):
            raise LossError("batch.mask", "ipo needs at least one counted token in every row")
        policy, ref = policy / counts, ref / counts
    logratios = policy - ref  # (2P,)
    h = logratios[:pairs] - logratios[pairs:]  # (P,)
    losses = _pair_losses(h, variant, beta, label_smoothing)  # (P,)

    rewards = beta * logratios.detach()  # (2P,)
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]  # (P,), (P,)
    policy = policy.detach()
    return LossOutput(
        loss=losses.mean(),
        metrics={
            "rewards_chosen": float(chosen_rewards.mean()),
            "rewards_rejected": float(rejected_rewards.mean()),
            "margin": float((chosen_rewards - rejected_rewards).mean()),
            "accuracy": float((chosen_rewards > rejected_rewards).to(torch.float64).mean()),
            "logps_chosen": float(policy[:pairs].mean()),
            "logps_rejected": float(policy[pairs:].mean()),
        },
        num_tokens=2 * pairs,
    )


def _pair_losses(h: torch.Tensor, variant: str, beta: float, eps: float) -> torch.Tensor:
    """(P,) per-pair losses from (P,) log-ratio margins ``h``."""
    if variant == "sigmoid":
        return -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
    if variant == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if variant == "hinge":
        return torch.relu(1 - beta * h)
    return (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps)


SPEC = LossSpec(
    name="dpo",
    field="dpo",
    fn=dpo,
    params=(
        Param("variant", "sigmoid", choices=VARIANTS),
        Param("beta", 0.1, POSITIVE),
        Param("label_smoothing", 0.0, BELOW_HALF),
    ),
    model=CAUSAL_LM,
    sequence_inputs=("ref_logps",),
    shard="pairs",
)
