"""GenerationService servicer: proto <-> domain only."""

from __future__ import annotations

import time

from grpc import aio

from alignd.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from alignd_server.common.holder import ModelHolder
from alignd_server.common.info import server_info
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.models import load_causal_lm
from alignd_server.common.tokenize_rpc import serve_tokenize
from alignd_server.generation.config import GenerationSettings

SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Hosts the policy. Generate, streaming and weight updates are served by the engine."""

    name = SERVICE

    def __init__(self, settings: GenerationSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.holder = ModelHolder("policy")
        self.weights_version = 0
        self.started_at = time.time()

    def register(self, server: aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self, server)

    async def start(self) -> None:
        await self.holder.load_configured(self.settings, load_causal_lm)

    async def stop(self) -> None:
        self.holder.loaded = None

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context
    ) -> common_pb2.TokenizeResponse:
        return await serve_tokenize(request, self.holder.require().tokenizer, self.settings)

    async def GetInfo(
        self, request: common_pb2.GetInfoRequest, context
    ) -> generation_pb2.GenerationInfo:
        info = server_info(
            SERVICE,
            self.settings,
            self.started_at,
            self.holder.require(),
            max_new_tokens=self.settings.max_new_tokens,
        )
        return generation_pb2.GenerationInfo(
            server=info, engine=self.settings.engine, weights_version=self.weights_version
        )
