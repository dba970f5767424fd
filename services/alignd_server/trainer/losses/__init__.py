"""The trainer's losses: pure torch functions from :class:`LossInputs` to :class:`LossOutput`,
each declared with its :class:`LossSpec`.

``SPECS`` maps each loss's name in the API to its spec, ``LOSSES`` to its function; keyword
arguments after the inputs are the loss's hyperparameters.
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
from alignd_server.trainer.losses.bradley_terry import SPEC as BRADLEY_TERRY
from alignd_server.trainer.losses.bradley_terry import bradley_terry
from alignd_server.trainer.losses.cross_entropy import SPEC as CROSS_ENTROPY
from alignd_server.trainer.losses.cross_entropy import cross_entropy
from alignd_server.trainer.losses.dpo import SPEC as DPO
from alignd_server.trainer.losses.dpo import dpo
from alignd_server.trainer.losses.kto import SPEC as KTO
from alignd_server.trainer.losses.kto import kto
from alignd_server.trainer.losses.policy_gradient import SPEC as POLICY_GRADIENT
from alignd_server.trainer.losses.policy_gradient import policy_gradient
from alignd_server.trainer.losses.ppo import SPEC as PPO
from alignd_server.trainer.losses.ppo import ppo
from alignd_server.trainer.losses.spec import LossSpec

SPECS: dict[str, LossSpec] = {
    spec.name: spec for spec in (CROSS_ENTROPY, BRADLEY_TERRY, DPO, KTO, PPO, POLICY_GRADIENT)
}
BY_FIELD: dict[str, LossSpec] = {spec.field: spec for spec in SPECS.values()}
"""The specs by their ``alignd.v1.Loss`` oneof field."""
LOSSES: dict[str, Callable[..., LossOutput]] = {name: spec.fn for name, spec in SPECS.items()}

__all__ = [
    "BY_FIELD",
    "LOSSES",
    "SPECS",
    "LossError",
    "LossInputs",
    "LossOutput",
    "LossSpec",
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
