"""The trainer's losses: pure torch functions from :class:`LossInputs` to :class:`LossOutput`.

``LOSSES`` maps each loss's name in the API to its function; keyword arguments after the inputs
are the loss's hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable

from alignd_server.trainer.losses.base import (
    LossError,
    LossInputs,
    LossOutput,
    masked_mean,
    masked_sum,
    sequence_logps,
)
from alignd_server.trainer.losses.bradley_terry import bradley_terry
from alignd_server.trainer.losses.cross_entropy import cross_entropy
from alignd_server.trainer.losses.dpo import dpo
from alignd_server.trainer.losses.kto import kto
from alignd_server.trainer.losses.policy_gradient import policy_gradient
from alignd_server.trainer.losses.ppo import ppo

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "cross_entropy": cross_entropy,
    "bradley_terry": bradley_terry,
    "dpo": dpo,
    "kto": kto,
    "ppo": ppo,
    "policy_gradient": policy_gradient,
}

__all__ = [
    "LOSSES",
    "LossError",
    "LossInputs",
    "LossOutput",
    "bradley_terry",
    "cross_entropy",
    "dpo",
    "kto",
    "masked_mean",
    "masked_sum",
    "policy_gradient",
    "ppo",
    "sequence_logps",
]
