"""TrainerService servicer: proto <-> domain only."""

from __future__ import annotations

import time

from grpc import aio

from alignd.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from alignd_server.common.holder import ModelHolder
from alignd_server.common.info import server_info
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.tokenize_rpc import serve_tokenize
from alignd_server.trainer.config import TrainerSettings

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Holds the trainable model once Initialize loads it; the training primitives are served
    by the training engine."""

    name = SERVICE

    def __init__(self, settings: TrainerSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.holder = ModelHolder("trainer model (call Initialize first)")
        self.started_at = time.time()

    def register(self, server: aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self) -> None:
        """Nothing to load: the model comes with Initialize."""

    async def stop(self) -> None:
        self.holder.loaded = None

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context
    ) -> common_pb2.TokenizeResponse:
        return await serve_tokenize(request, self.holder.require().tokenizer, self.settings)

    async def GetState(
        self, request: trainer_pb2.GetStateRequest, context
    ) -> trainer_pb2.TrainerState:
        return trainer_pb2.TrainerState(initialized=self.holder.loaded is not None)

    async def GetInfo(self, request: common_pb2.GetInfoRequest, context) -> trainer_pb2.TrainerInfo:
        info = server_info(SERVICE, self.settings, self.started_at, self.holder.loaded)
        return trainer_pb2.TrainerInfo(server=info, world_size=1)
