"""Client of the GenerationService: sampling and versioned weight updates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from alignd.clients.tokenize import (
    AsyncTokenizingClient,
    PromptLike,
    TokenizingClient,
    prompt_to_proto,
)
from alignd.errors import from_rpc_error
from alignd.tensors import from_numpy, to_numpy
from alignd.v1 import common_pb2, generation_pb2, generation_pb2_grpc

SERVICE = "alignd.v1.GenerationService"
CHUNK_BYTES = 4 * 1024 * 1024
FINISH = {
    generation_pb2.FINISH_REASON_EOS: "eos",
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class SamplingParams:
    """How to sample (see ``alignd.v1.SamplingParams``); temperature 0 is greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def to_proto(self) -> generation_pb2.SamplingParams:
        return generation_pb2.SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            n=self.n,
            seed=self.seed,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
        )


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    Attributes:
        token_ids: (T,) int32 generated ids (with the EOS or stop token that ended it).
        text: decoded text (stop string removed).
        logprobs: (T,) float32 log softmax(logits / T)[token], before top-k/top-p.
        finish_reason: ``eos``, ``stop`` or ``length``.
        prompt_token_ids: (P,) int32 prompt ids as the model saw them.
        weights_version: version of the weights that produced it.
    """

    token_ids: np.ndarray
    text: str
    logprobs: np.ndarray
    finish_reason: str
    prompt_token_ids: np.ndarray
    weights_version: int


def _completions(response: generation_pb2.GenerateResponse) -> list[list[Completion]]:
    return [
        [
            Completion(
                to_numpy(c.token_ids),
                c.text,
                to_numpy(c.logprobs),
                FINISH[c.finish_reason],
                to_numpy(result.prompt_token_ids),
                response.weights_version,
            )
            for c in result.completions
        ]
        for result in response.results
    ]


ACCEPTED_KEY = "alignd-update"
"""Response-header key with which the server accepts an UpdateWeights header."""


def weight_messages(
    tensors: Mapping[str, np.ndarray], version: int, partial: bool, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[generation_pb2.UpdateWeightsRequest]:
    """The UpdateWeights stream for ``tensors``: header, chunks of <= 4 MiB, commit."""
    if not 0 < chunk_bytes <= CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {CHUNK_BYTES}]")
    encoded = {name: from_numpy(np.asarray(t)) for name, t in tensors.items()}
    yield generation_pb2.UpdateWeightsRequest(
        header=generation_pb2.WeightsHeader(
            version=version,
            partial=partial,
            tensors=[
                generation_pb2.TensorSpec(name=n, dtype=t.dtype, shape=t.shape)
                for n, t in encoded.items()
            ],
        )
    )
    total = 0
    for name, tensor in encoded.items():
        data = memoryview(tensor.data)
        for offset in range(0, len(data), chunk_bytes):
            piece = bytes(data[offset : offset + chunk_bytes])
            total += len(piece)
            yield generation_pb2.UpdateWeightsRequest(
                chunk=generation_pb2.TensorChunk(name=name, offset=offset, data=piece)
            )
    yield generation_pb2.UpdateWeightsRequest(
        commit=generation_pb2.WeightsCommit(total_bytes=total)
    )


class GenerationClient(TokenizingClient):
    """Sync client of the generation service."""

    service = SERVICE
    stub_class = generation_pb2_grpc.GenerationServiceStub

    def info(self, *, timeout: float | None = None) -> generation_pb2.GenerationInfo:
        """Engine, model, weights version and limits."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    def generate(
        self,
        prompts: Sequence[PromptLike],
        params: SamplingParams | None = None,
        *,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> list[list[Completion]]:
        """n completions for each prompt (text, chat turns or token ids). ``isolated``: batched
        with nothing else, so the same request gives the same bits whatever the server serves
        (slower for everyone while it runs)."""
        request = generation_pb2.GenerateRequest(
            prompts=[prompt_to_proto(p) for p in prompts],
            params=(params or SamplingParams()).to_proto(),
            isolated=isolated,
        )
        return _completions(self._call("Generate", request, timeout=timeout))

    def stream(
        self,
        prompt: PromptLike,
        params: SamplingParams | None = None,
        *,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> Iterator[generation_pb2.GenerateStreamResponse]:
        """Streams the tokens of one prompt's completions as they are generated."""
        request = generation_pb2.GenerateStreamRequest(
            prompt=prompt_to_proto(prompt),
            params=(params or SamplingParams()).to_proto(),
            isolated=isolated,
        )
        try:
            yield from self._stub.GenerateStream(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"{self.service}/GenerateStream") from None

    def update_weights(
        self,
        tensors: Mapping[str, np.ndarray],
        version: int,
        *,
        partial: bool = False,
        timeout: float | None = None,
    ) -> generation_pb2.UpdateWeightsResponse:
        """Streams named tensors (state_dict names); the server swaps them in atomically."""
        messages = weight_messages(tensors, version, partial)
        try:
            return self._stub.UpdateWeights(messages, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"{self.service}/UpdateWeights") from None

    def load_weights(
        self, path: str, version: int, *, partial: bool = False, timeout: float | None = None
    ) -> generation_pb2.UpdateWeightsResponse:
        """Has the server load safetensors weights from a directory it can read."""
        request = generation_pb2.LoadWeightsRequest(path=path, version=version, partial=partial)
        return self._call("LoadWeights", request, timeout=timeout)

    def receive_weights(
        self, request: generation_pb2.ReceiveWeightsRequest, *, timeout: float | None = None
    ) -> generation_pb2.UpdateWeightsResponse:
        """Has the server receive weights over a torch.distributed group (the collective
        transport; the trainer's PushWeights with ``rendezvous`` drives it)."""
        return self._call("ReceiveWeights", request, timeout=timeout)


class AsyncGenerationClient(AsyncTokenizingClient):
    """asyncio client of the generation service (see :class:`GenerationClient`)."""

    service = SERVICE
    stub_class = generation_pb2_grpc.GenerationServiceStub

    async def info(self, *, timeout: float | None = None) -> generation_pb2.GenerationInfo:
        """Engine, model, weights version and limits."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    async def generate(
        self,
        prompts: Sequence[PromptLike],
        params: SamplingParams | None = None,
        *,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> list[list[Completion]]:
        """See :meth:`GenerationClient.generate`."""
        request = generation_pb2.GenerateRequest(
            prompts=[prompt_to_proto(p) for p in prompts],
            params=(params or SamplingParams()).to_proto(),
            isolated=isolated,
        )
        return _completions(await self._call("Generate", request, timeout=timeout))

    async def stream(
        self,
        prompt: PromptLike,
        params: SamplingParams | None = None,
        *,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        """See :meth:`GenerationClient.stream`."""
        request = generation_pb2.GenerateStreamRequest(
            prompt=prompt_to_proto(prompt),
            params=(params or SamplingParams()).to_proto(),
            isolated=isolated,
        )
        try:
            async for message in self._stub.GenerateStream(
                request, timeout=timeout or self.timeout
            ):
                yield message
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"{self.service}/GenerateStream") from None

    async def update_weights(
        self,
        tensors: Mapping[str, np.ndarray],
        version: int,
        *,
        partial: bool = False,
        timeout: float | None = None,
    ) -> generation_pb2.UpdateWeightsResponse:
        """See :meth:`GenerationClient.update_weights`.

        Sends the header, then waits for the server's answer to it before the chunks: a
        rejected update (a busy server, a stale version, a bad name) reports its own status
        instead of the failed write grpc.aio would report, and sends no weights for nothing.
        """
        messages = await asyncio.to_thread(lambda: list(weight_messages(tensors, version, partial)))
        call = self._stub.UpdateWeights(timeout=timeout or self.timeout)
        try:
            try:
                await call.write(messages[0])
                answer = await call.initial_metadata()
                if any(key == ACCEPTED_KEY for key, _ in answer or ()):
                    for message in messages[1:]:
                        await call.write(message)
                    await call.done_writing()
            except asyncio.InvalidStateError:
                pass  # the server answered while we wrote: its status follows
            return await call
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"{self.service}/UpdateWeights") from None

    async def load_weights(
        self, path: str, version: int, *, partial: bool = False, timeout: float | None = None
    ) -> generation_pb2.UpdateWeightsResponse:
        """See :meth:`GenerationClient.load_weights`."""
        request = generation_pb2.LoadWeightsRequest(path=path, version=version, partial=partial)
        return await self._call("LoadWeights", request, timeout=timeout)

    async def receive_weights(
        self, request: generation_pb2.ReceiveWeightsRequest, *, timeout: float | None = None
    ) -> generation_pb2.UpdateWeightsResponse:
        """See :meth:`GenerationClient.receive_weights`."""
        return await self._call("ReceiveWeights", request, timeout=timeout)
