"""Client of the GenerationService."""

from __future__ import annotations

from alignd.clients.tokenize import AsyncTokenizingClient, TokenizingClient
from alignd.v1 import common_pb2, generation_pb2, generation_pb2_grpc

SERVICE = "alignd.v1.GenerationService"


class GenerationClient(TokenizingClient):
    """Sync client of the generation service."""

    service = SERVICE
    stub_class = generation_pb2_grpc.GenerationServiceStub

    def info(self, *, timeout: float | None = None) -> generation_pb2.GenerationInfo:
        """Engine, model, weights version and limits."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)


class AsyncGenerationClient(AsyncTokenizingClient):
    """asyncio client of the generation service."""

    service = SERVICE
    stub_class = generation_pb2_grpc.GenerationServiceStub

    async def info(self, *, timeout: float | None = None) -> generation_pb2.GenerationInfo:
        """Engine, model, weights version and limits."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)
