"""Token-level cross-entropy (supervised fine-tuning), optionally label-smoothed.

With ε the smoothing and N the number of counted completion tokens of the batch:

    NLL  = (1/N) Σ_{counted t} −log π(y_t)
    loss = (1/N) Σ_{counted t} [(1−ε)·(−log π(y_t)) + ε·(−(1/V) Σ_v log π(v))]

The smoothed form is Szegedy et al. 2016, "Rethinking the Inception Architecture" (uniform
label smoothing), written with the vocabulary-mean log-probability ``mean_logprobs``.
"""

from __future__ import annotations

import math

from alignd_server.trainer.losses.base import (
    LossInputs,
    LossOutput,
    masked_mean,
    require_like_logprobs,
    require_policy,
    token_count,
)
from alignd_server.trainer.losses.spec import CAUSAL_LM, FRACTION, LossSpec, Param, Statistic


def cross_entropy(inputs: LossInputs, label_smoothing: float = 0.0) -> LossOutput:
    """Mean negative log-likelihood over every counted completion token of the batch.

    Args:
        inputs: needs ``logprobs`` and ``mask``; ``mean_logprobs`` when ``label_smoothing > 0``.
        label_smoothing: ε in [0, 1).

    Returns:
        The loss; metrics ``nll`` (the unsmoothed mean NLL) and ``perplexity`` (exp of it).

    Raises:
        LossError: a needed input is missing or has the wrong shape.
        ValueError: ``label_smoothing`` is outside [0, 1).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    logprobs, mask = require_policy(inputs)  # (B, T), (B, T)
    nll = masked_mean(-logprobs, mask)  # ()
    loss = nll
    if label_smoothing > 0.0:
        mean_logprobs = require_like_logprobs(inputs.mean_logprobs, "batch.mean_logprobs", mask)
        smooth = masked_mean(-mean_logprobs, mask)  # ()
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    nll_value = float(nll.detach())
    return LossOutput(
        loss=loss,
        metrics={"nll": nll_value, "perplexity": math.exp(min(nll_value, 700.0))},
        num_tokens=token_count(mask),
    )


SPEC = LossSpec(
    name="cross_entropy",
    field="cross_entropy",
    fn=cross_entropy,
    params=(Param("label_smoothing", 0.0, FRACTION),),
    model=CAUSAL_LM,
    statistics=(Statistic("mean_logprobs", when="label_smoothing"),),
)
