"""Client of the TrainerService."""

from __future__ import annotations

from alignd.clients.tokenize import AsyncTokenizingClient, TokenizingClient
from alignd.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

SERVICE = "alignd.v1.TrainerService"


class TrainerClient(TokenizingClient):
    """Sync client of the trainer service."""

    service = SERVICE
    stub_class = trainer_pb2_grpc.TrainerServiceStub

    def info(self, *, timeout: float | None = None) -> trainer_pb2.TrainerInfo:
        """Model (once initialized), limits and parallelism."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    def state(self, *, timeout: float | None = None) -> trainer_pb2.TrainerState:
        """Step, model and optimizer state."""
        return self._call("GetState", trainer_pb2.GetStateRequest(), timeout=timeout)


class AsyncTrainerClient(AsyncTokenizingClient):
    """asyncio client of the trainer service."""

    service = SERVICE
    stub_class = trainer_pb2_grpc.TrainerServiceStub

    async def info(self, *, timeout: float | None = None) -> trainer_pb2.TrainerInfo:
        """Model (once initialized), limits and parallelism."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    async def state(self, *, timeout: float | None = None) -> trainer_pb2.TrainerState:
        """Step, model and optimizer state."""
        return await self._call("GetState", trainer_pb2.GetStateRequest(), timeout=timeout)
