"""Client of the ReferenceService."""

from __future__ import annotations

from alignd.clients.tokenize import AsyncTokenizingClient, TokenizingClient
from alignd.v1 import common_pb2, reference_pb2, reference_pb2_grpc

SERVICE = "alignd.v1.ReferenceService"


class ReferenceClient(TokenizingClient):
    """Sync client of the reference service."""

    service = SERVICE
    stub_class = reference_pb2_grpc.ReferenceServiceStub

    def info(self, *, timeout: float | None = None) -> reference_pb2.ReferenceInfo:
        """Model, limits and server state."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)


class AsyncReferenceClient(AsyncTokenizingClient):
    """asyncio client of the reference service."""

    service = SERVICE
    stub_class = reference_pb2_grpc.ReferenceServiceStub

    async def info(self, *, timeout: float | None = None) -> reference_pb2.ReferenceInfo:
        """Model, limits and server state."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)
