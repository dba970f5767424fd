"""Client of the ReferenceService: log-probabilities under the reference policy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np

from alignd.clients.tokenize import AsyncTokenizingClient, TokenizingClient
from alignd.errors import from_rpc_error
from alignd.tensors import from_ragged, to_ragged
from alignd.v1 import common_pb2, reference_pb2, reference_pb2_grpc

SERVICE = "alignd.v1.ReferenceService"


def logprob_requests(
    sequences: Sequence[Sequence[int] | np.ndarray],
    prompt_lengths: Sequence[int],
    chunk: int,
    temperature: float | None = None,
    isolated: bool = False,
) -> list[reference_pb2.ComputeLogprobsRequest]:
    """ComputeLogprobsRequests of at most ``chunk`` sequences, in order."""
    if len(sequences) != len(prompt_lengths):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lengths)} prompt lengths")
    rows = [np.asarray(s, dtype=np.int32) for s in sequences]
    return [
        reference_pb2.ComputeLogprobsRequest(
            input_ids=from_ragged(rows[i : i + chunk], common_pb2.DTYPE_INT32),
            prompt_lengths=prompt_lengths[i : i + chunk],
            temperature=temperature,
            isolated=isolated,
        )
        for i in range(0, len(rows), chunk)
    ]


def _rows(responses: Sequence[reference_pb2.ComputeLogprobsResponse]) -> list[np.ndarray]:
    return [row for r in responses for row in to_ragged(r.logprobs)]


class ReferenceClient(TokenizingClient):
    """Sync client of the reference service. Large batches are split to the server's limit
    and sent concurrently."""

    service = SERVICE
    stub_class = reference_pb2_grpc.ReferenceServiceStub
    _max_batch: int | None = None

    def info(self, *, timeout: float | None = None) -> reference_pb2.ReferenceInfo:
        """Model, limits and server state."""
        return self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    def logprobs(
        self,
        sequences: Sequence[Sequence[int] | np.ndarray],
        prompt_lengths: Sequence[int],
        *,
        temperature: float | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> list[np.ndarray]:
        """Per-token log pi_ref of each sequence's completion tokens.

        Args:
            sequences: token ids, prompt followed by completion.
            prompt_lengths: prompt length p of each sequence, 1 <= p < len(sequence).
            temperature: log-probs of softmax(logits / temperature), as generation reports
                them for that temperature (default 1).
            isolated: have each request batched only with its own rows (bit-identical
                log-probs whatever else the server does; a job's ``deterministic`` mode).
            timeout: deadline of each request, in seconds.

        Returns:
            One (len - p,) float32 array per sequence.
        """
        if self._max_batch is None:
            self._max_batch = self.info().server.limits.max_batch_size or 32
        requests = logprob_requests(
            sequences, prompt_lengths, self._max_batch, temperature, isolated
        )
        futures = [
            self._stub.ComputeLogprobs.future(r, timeout=timeout or self.timeout) for r in requests
        ]
        try:
            return _rows([f.result() for f in futures])
        except grpc.RpcError as err:
            for f in futures:
                f.cancel()
            raise from_rpc_error(err, f"{self.service}/ComputeLogprobs") from None


class AsyncReferenceClient(AsyncTokenizingClient):
    """asyncio client of the reference service (see :class:`ReferenceClient`)."""

    service = SERVICE
    stub_class = reference_pb2_grpc.ReferenceServiceStub
    _max_batch: int | None = None

    async def info(self, *, timeout: float | None = None) -> reference_pb2.ReferenceInfo:
        """Model, limits and server state."""
        return await self._call("GetInfo", common_pb2.GetInfoRequest(), timeout=timeout)

    async def logprobs(
        self,
        sequences: Sequence[Sequence[int] | np.ndarray],
        prompt_lengths: Sequence[int],
        *,
        temperature: float | None = None,
        isolated: bool = False,
        timeout: float | None = None,
    ) -> list[np.ndarray]:
        """See :meth:`ReferenceClient.logprobs`."""
        if self._max_batch is None:
            self._max_batch = (await self.info()).server.limits.max_batch_size or 32
        requests = logprob_requests(
            sequences, prompt_lengths, self._max_batch, temperature, isolated
        )
        return _rows(
            await asyncio.gather(
                *(self._call("ComputeLogprobs", r, timeout=timeout) for r in requests)
            )
        )
