"""Bradley-Terry pairwise loss for reward models, with optional margin and reward centering.

With P pairs, chosen rewards r_c and rejected rewards r_r (rows [0, P) and [P, 2P) of
``rewards``), a per-pair margin m (0 without ``margins``) and centering coefficient c:

    loss = (1/P) Σ_i −log σ(r_c,i − r_r,i − m_i)  +  c · (1/P) Σ_i (r_c,i + r_r,i)²

The first term is Bradley & Terry 1952 as used for reward models by Ouyang et al. 2022
("Training language models to follow instructions with human feedback"); the margin follows
Touvron et al. 2023 (Llama 2); the centering term is Eisenstein et al. 2023 ("Helping or
Herding?"), in TRL's form ``center_rewards_coefficient · mean((r_c + r_r)²)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignd_server.trainer.losses.base import (
    LossError,
    LossInputs,
    LossOutput,
    require_sequence_input,
    split_pairs,
)
from alignd_server.trainer.losses.spec import CLASSIFIER, COEFFICIENT, LossSpec, Param


def bradley_terry(inputs: LossInputs, center_rewards_coefficient: float = 0.0) -> LossOutput:
    """Mean −log σ(r_c − r_r − m) over pairs, plus the reward-centering penalty.

    Args:
        inputs: needs ``rewards`` (2P,), chosen rows then rejected rows; optional
            ``sequence_inputs["margins"]`` (P,).
        center_rewards_coefficient: c ≥ 0; 0 turns centering off.

    Returns:
        The loss; metrics ``accuracy`` (fraction of pairs with r_c > r_r), ``margin``
        (mean r_c − r_r), ``reward_chosen`` and ``reward_rejected`` (means). ``num_tokens``
        counts sequences (2P).

    Raises:
        LossError: ``rewards`` is missing, not 1-D, or has an odd number of rows; ``margins``
            has the wrong shape.
    """
    rewards = inputs.rewards  # (2P,)
    if rewards is None:
        raise LossError("batch.rewards", "is required by this loss")
    if rewards.dim() != 1:
        raise LossError("batch.rewards", f"must be (B,), got {tuple(rewards.shape)}")
    pairs = split_pairs(rewards.shape[0], "batch.rewards")
    chosen, rejected = rewards[:pairs], rewards[pairs:]  # (P,), (P,)
    diff = chosen - rejected  # (P,)
    logits = diff
    if "margins" in inputs.sequence_inputs:
        logits = diff - require_sequence_input(inputs, "margins", pairs)
    loss = -F.logsigmoid(logits).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    diff = diff.detach()
    return LossOutput(
        loss=loss,
        metrics={
            "accuracy": float((diff > 0).to(torch.float64).mean()),
            "margin": float(diff.mean()),
            "reward_chosen": float(chosen.detach().mean()),
            "reward_rejected": float(rejected.detach().mean()),
        },
        num_tokens=2 * pairs,
    )


SPEC = LossSpec(
    name="bradley_terry",
    field="bradley_terry",
    fn=bradley_terry,
    params=(Param("center_rewards_coefficient", 0.0, COEFFICIENT),),
    model=CLASSIFIER,
    sequence_inputs=("margins",),
    shard="pairs",
)
