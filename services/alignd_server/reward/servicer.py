"""RewardService servicer: proto <-> domain only."""

from __future__ import annotations

import time

from grpc import aio

from alignd.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from alignd_server.common.holder import ModelHolder
from alignd_server.common.info import model_info, server_info
from alignd_server.common.models import load_sequence_classifier
from alignd_server.reward.config import RewardSettings

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
DEFAULT_SCORER = "default"


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Hosts the reward model(s). Score and Compare are served by the scoring engine."""

    name = SERVICE

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.holder = ModelHolder("reward model")
        self.started_at = time.time()

    def register(self, server: aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await self.holder.load_configured(self.settings, load_sequence_classifier)

    async def stop(self) -> None:
        self.holder.loaded = None

    async def GetInfo(self, request: common_pb2.GetInfoRequest, context) -> reward_pb2.RewardInfo:
        loaded = self.holder.require()
        info = server_info(SERVICE, self.settings, self.started_at, loaded)
        scorer = reward_pb2.ScorerInfo(
            name=DEFAULT_SCORER,
            kind=reward_pb2.SCORER_KIND_MODEL,
            model=model_info(loaded),
            normalization=reward_pb2.ScoreNormalization(scale=1.0),
            limits=info.limits,
            is_default=True,
        )
        return reward_pb2.RewardInfo(server=info, scorers=[scorer])
