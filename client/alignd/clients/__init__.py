"""Typed clients of the four alignd services (sync, with asyncio twins)."""

from alignd.clients.base import AsyncClientBase, ClientBase
from alignd.clients.generation import AsyncGenerationClient, GenerationClient
from alignd.clients.reference import AsyncReferenceClient, ReferenceClient
from alignd.clients.reward import AsyncRewardClient, RewardClient
from alignd.clients.tokenize import TokenizedSequence
from alignd.clients.trainer import AsyncTrainerClient, TrainerClient

__all__ = [
    "AsyncClientBase",
    "AsyncGenerationClient",
    "AsyncReferenceClient",
    "AsyncRewardClient",
    "AsyncTrainerClient",
    "ClientBase",
    "GenerationClient",
    "ReferenceClient",
    "RewardClient",
    "TokenizedSequence",
    "TrainerClient",
]
