"""ReferenceService servicer: proto <-> domain only."""

from __future__ import annotations

import time

from grpc import aio

from alignd.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from alignd_server.common.holder import ModelHolder
from alignd_server.common.info import server_info
from alignd_server.common.models import load_causal_lm
from alignd_server.common.tokenize_rpc import serve_tokenize
from alignd_server.reference.config import ReferenceSettings

SERVICE = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    """Hosts the frozen reference policy. ComputeLogprobs is served by the log-prob engine."""

    name = SERVICE

    def __init__(self, settings: ReferenceSettings) -> None:
        self.settings = settings
        self.holder = ModelHolder("reference model")
        self.started_at = time.time()

    def register(self, server: aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(self, server)

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
    ) -> reference_pb2.ReferenceInfo:
        loaded = self.holder.require()
        return reference_pb2.ReferenceInfo(
            server=server_info(SERVICE, self.settings, self.started_at, loaded)
        )
