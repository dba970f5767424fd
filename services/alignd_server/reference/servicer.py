"""ReferenceService servicer: proto <-> domain only."""

from __future__ import annotations

import time

import numpy as np
from grpc import aio

from alignd.tensors import from_ragged
from alignd.v1 import common_pb2, reference_pb2, reference_pb2_grpc
from alignd_server.common.batching import BatcherMetrics, deadline_of
from alignd_server.common.holder import ModelHolder
from alignd_server.common.info import server_info
from alignd_server.common.metrics import ServerMetrics
from alignd_server.common.models import load_causal_lm
from alignd_server.common.tokenize_rpc import serve_tokenize
from alignd_server.common.validation import prompt_lengths, temperature, token_rows
from alignd_server.reference.config import ReferenceSettings
from alignd_server.reference.logprobs import LogprobEngine

SERVICE = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    """Serves log-probabilities under the frozen reference policy."""

    name = SERVICE

    def __init__(self, settings: ReferenceSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.holder = ModelHolder("reference model")
        self.started_at = time.time()
        self._metrics = BatcherMetrics(metrics.registry)
        self.engine: LogprobEngine | None = None

    def register(self, server: aio.Server) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(self, server)

    async def start(self) -> None:
        loaded = await self.holder.load_configured(self.settings, load_causal_lm)
        limit = loaded.sequence_limit(self.settings.max_sequence_length)
        self.settings = self.settings.model_copy(update={"max_sequence_length": limit})
        self.engine = LogprobEngine(loaded, self.settings, self._metrics)
        self.engine.batcher.start()

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.batcher.stop()
        self.holder.loaded = None

    async def ComputeLogprobs(
        self, request: reference_pb2.ComputeLogprobsRequest, context
    ) -> reference_pb2.ComputeLogprobsResponse:
        self.holder.require()
        engine = self.engine
        engine.batcher.check_capacity(len(request.input_ids.lengths))  # before decoding
        rows = token_rows(
            request.input_ids,
            "input_ids",
            vocab_size=engine.vocab_size,
            max_batch_size=self.settings.max_batch_size,
            max_length=self.settings.max_sequence_length,
            min_length=2,
        )
        prompts = prompt_lengths(request.prompt_lengths, rows, "prompt_lengths")
        logprobs = await engine.logprobs(
            rows, prompts.tolist(), temperature(request), deadline_of(context), request.isolated
        )
        response = reference_pb2.ComputeLogprobsResponse(
            logprobs=from_ragged(logprobs, common_pb2.DTYPE_FLOAT32)
        )
        if request.return_sums:
            response.sums.extend(float(np.sum(row, dtype=np.float64)) for row in logprobs)
        return response

    async def Tokenize(
        self, request: common_pb2.TokenizeRequest, context
    ) -> common_pb2.TokenizeResponse:
        return await serve_tokenize(request, self.holder.require().tokenizer, self.settings)

    async def GetInfo(
        self, request: common_pb2.GetInfoRequest, context
    ) -> reference_pb2.ReferenceInfo:
        loaded = self.holder.require()
        info = server_info(
            SERVICE,
            self.settings,
            self.started_at,
            loaded,
            max_batch_tokens=self.settings.max_batch_tokens,
        )
        return reference_pb2.ReferenceInfo(server=info)
