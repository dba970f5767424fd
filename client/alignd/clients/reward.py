"""Client of the RewardService (scoring lands with the scoring engine)."""

from __future__ import annotations

from alignd.clients.base import AsyncClientBase, ClientBase
from alignd.v1 import common_pb2, reward_pb2, reward_pb2_grpc

SERVICE = "alignd.v1.RewardService"


class RewardClient(ClientBase):
    """Sync client of the reward service."""

    service = SERVICE
    stub_class = reward_pb2_grpc.RewardServiceStub

    def info(self, *, timeout: float | None = None) -> reward_pb2.RewardInfo:
        """Scorers, their models and limits."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)


class AsyncRewardClient(AsyncClientBase):
    """asyncio client of the reward service."""

    service = SERVICE
    stub_class = reward_pb2_grpc.RewardServiceStub

    async def info(self, *, timeout: float | None = None) -> reward_pb2.RewardInfo:
        """Scorers, their models and limits."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)
