"""Typed losses for ``TrainerClient.forward_backward`` (see ``alignd.v1.Loss``).

Each is a small dataclass whose fields are the loss's parameters, with the defaults the server
applies (its loss specs, ``alignd_server.trainer.losses``, hold them; a test checks these
classes agree with them); ``to_proto()`` builds the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignd.v1 import trainer_pb2

_DPO = {"sigmoid": 0, "ipo": 1, "hinge": 2, "robust": 3}
_AGGREGATION = {"token_mean": 0, "sequence_mean": 1}


@dataclass(frozen=True)
class CrossEntropy:
    """Masked token-level NLL (SFT)."""

    label_smoothing: float = 0.0

    def to_proto(self) -> trainer_pb2.Loss:
        return trainer_pb2.Loss(
            cross_entropy=trainer_pb2.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        )


@dataclass(frozen=True)
class BradleyTerry:
    """Reward-model pairwise loss; rows [0, P) chosen, [P, 2P) rejected."""

    center_rewards_coefficient: float = 0.0

    def to_proto(self) -> trainer_pb2.Loss:
        return trainer_pb2.Loss(
            bradley_terry=trainer_pb2.BradleyTerryLoss(
                center_rewards_coefficient=self.center_rewards_coefficient
            )
        )


@dataclass(frozen=True)
class DPO:
    """DPO family; needs ``sequence_inputs["ref_logps"]``."""

    variant: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0

    def to_proto(self) -> trainer_pb2.Loss:
        return trainer_pb2.Loss(
            dpo=trainer_pb2.DpoLoss(
                variant=_DPO[self.variant], beta=self.beta, label_smoothing=self.label_smoothing
            )
        )


@dataclass(frozen=True)
class KTO:
    """KTO; needs ``labels``, ``ref_logps`` and ``kl_rows`` sequence inputs."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def to_proto(self) -> trainer_pb2.Loss:
        return trainer_pb2.Loss(
            kto=trainer_pb2.KtoLoss(
                beta=self.beta,
                desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
            )
        )


@dataclass(frozen=True)
class PPO:
    """PPO; needs old_logprobs, advantages, returns and old_values token inputs (with
    behaviour_logprobs too, the policy term is weighted by min(π_old / π_behaviour, is_cap))."""

    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    temperature: float = 1.0
    is_cap: float = 2.0

    def to_proto(self) -> trainer_pb2.Loss:
        return trainer_pb2.Loss(
            ppo=trainer_pb2.PpoLoss(
                clip_range=self.clip_range,
                value_clip_range=self.value_clip_range,
                vf_coef=self.vf_coef,
                entropy_coef=self.entropy_coef,
                temperature=self.temperature,
                is_cap=self.is_cap,
            )
        )


@dataclass(frozen=True)
class PolicyGradient:
    """GRPO / RLOO / REINFORCE++; needs advantages (and old/ref log-probs as configured; with
    behaviour_logprobs too, the policy term is weighted by min(π_old / π_behaviour, is_cap))."""

    clip_range: float | None = None
    kl_coef: float = 0.0
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    temperature: float = 1.0
    is_cap: float = 2.0

    def to_proto(self) -> trainer_pb2.Loss:
        return trainer_pb2.Loss(
            policy_gradient=trainer_pb2.PolicyGradientLoss(
                clip_range=self.clip_range,
                kl_coef=self.kl_coef,
                aggregation=_AGGREGATION[self.aggregation],
                temperature=self.temperature,
                is_cap=self.is_cap,
            )
        )


Loss = CrossEntropy | BradleyTerry | DPO | KTO | PPO | PolicyGradient
