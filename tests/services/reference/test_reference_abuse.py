"""What a careless or hostile caller can do to the reference service: temperatures that make
NaN, tensors no array can hold, texts far beyond the model, and floods while the queue is
full. Each gets a clear answer, and refusals cost no model work."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from waiting import until_queued

from alignd import AsyncReferenceClient, ReferenceClient
from alignd.errors import InvalidArgumentError, ResourceExhaustedError
from alignd.tensors import from_ragged
from alignd.v1 import common_pb2, reference_pb2
from alignd_server.reference.logprobs import LogprobEngine

ROW = [5, 6, 7, 8, 9]


def logprobs_request(**fields) -> reference_pb2.ComputeLogprobsRequest:
    return reference_pb2.ComputeLogprobsRequest(
        input_ids=from_ragged([np.asarray(ROW, np.int32)], common_pb2.DTYPE_INT32),
        prompt_lengths=[2],
        **fields,
    )


def test_tiny_temperatures_are_refused_instead_of_answered_with_nan(serve):
    with ReferenceClient(serve("reference").target) as client:
        for temperature in (1e-30, 0.005):
            with pytest.raises(InvalidArgumentError, match=r"temperature: must be in \[0\.01, 100"):
                client._call("ComputeLogprobs", logprobs_request(temperature=temperature))
        (row,) = client.logprobs([ROW], [2], temperature=0.01)
        assert np.isfinite(row).all()


def test_a_zero_element_tensor_with_a_huge_dimension_is_an_invalid_argument(serve):
    huge = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT32, shape=[0, 2**63 - 1])
    request = reference_pb2.ComputeLogprobsRequest(
        input_ids=common_pb2.RaggedTensor(values=huge), prompt_lengths=[1]
    )
    with ReferenceClient(serve("reference").target) as client:
        with pytest.raises(InvalidArgumentError, match="larger than any array can be"):
            client._call("ComputeLogprobs", request)


def test_tokenize_bounds_texts_before_tokenizing_and_the_limit_follows_the_model(serve):
    with ReferenceClient(serve("reference").target) as client:
        limits = client.info().server.limits
        assert limits.max_sequence_length == 512  # the tiny model's positions, not 2048
        with pytest.raises(InvalidArgumentError, match=r"items\[0\]\.prompt: is more than"):
            client.tokenize(["x" * (8 << 20)])
        with pytest.raises(InvalidArgumentError, match=r"items\[0\]\.completion: is more than"):
            client.tokenize(["a prompt"], ["y" * (limits.max_text_bytes + 1)])


async def test_a_full_queue_refuses_before_decoding_the_request(serve, monkeypatch):
    entered, gate, decoded = threading.Event(), threading.Event(), []
    original_run = LogprobEngine._run

    def gated_run(self, items):
        entered.set()
        gate.wait(30)
        return original_run(self, items)

    monkeypatch.setattr(LogprobEngine, "_run", gated_run)
    import alignd_server.reference.servicer as servicer

    original_rows = servicer.token_rows
    monkeypatch.setattr(
        servicer, "token_rows", lambda *a, **k: decoded.append(1) or original_rows(*a, **k)
    )
    server = serve("reference", max_queue_size=2, max_batch_size=2, max_wait_ms=0)
    batcher = server.server.services[0].engine.batcher
    try:
        async with AsyncReferenceClient(server.target, retries=1) as client:
            first = asyncio.ensure_future(client.logprobs([ROW], [2]))
            assert await asyncio.to_thread(entered.wait, 30)
            queued = asyncio.ensure_future(client.logprobs([ROW, ROW], [2, 3]))
            await until_queued(batcher, 2)
            with pytest.raises(ResourceExhaustedError, match="max_queue_size 2"):
                await client.logprobs([ROW], [2])
            assert len(decoded) == 2  # the refused request was not decoded
            gate.set()
            assert len(await first) == 1 and len(await queued) == 2
    finally:
        gate.set()
