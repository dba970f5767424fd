"""alignd: RLHF as a platform. Python SDK.

Typed clients of the four services, the tensor codec, and the ``alignd`` CLI. This package
never needs torch.
"""

from alignd import losses
from alignd._version import __version__
from alignd.channel import TLSConfig, create_aio_channel, create_channel
from alignd.clients import (
    AsyncGenerationClient,
    AsyncReferenceClient,
    AsyncRewardClient,
    AsyncTrainerClient,
    GenerationClient,
    ReferenceClient,
    RewardClient,
    TokenizedSequence,
    TrainerClient,
)
from alignd.clients.generation import Completion, SamplingParams
from alignd.clients.reward import EnsembleScores
from alignd.clients.trainer import TrainBatch
from alignd.errors import AligndError
from alignd.platform import Platform

__all__ = [
    "AligndError",
    "AsyncGenerationClient",
    "AsyncReferenceClient",
    "AsyncRewardClient",
    "AsyncTrainerClient",
    "Completion",
    "EnsembleScores",
    "GenerationClient",
    "Platform",
    "ReferenceClient",
    "RewardClient",
    "SamplingParams",
    "TLSConfig",
    "TokenizedSequence",
    "TrainBatch",
    "TrainerClient",
    "__version__",
    "create_aio_channel",
    "create_channel",
    "losses",
]
