"""What a careless or hostile caller can do to the reward service: texts far beyond any model's
limit, items longer than the model's positions, and floods while the queue is full. Each gets
a clear answer that costs little, and well-formed requests alongside still succeed."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from waiting import until_queued

from alignd import AsyncRewardClient, RewardClient
from alignd.errors import AligndError, InvalidArgumentError, ResourceExhaustedError
from alignd.tasks.sentiment import SCORER
from alignd.v1 import reward_pb2
from alignd_server.reward.scorers import ModelScorer

HUGE = "x" * (8 << 20)  # 8 MiB


@pytest.mark.parametrize("format", ["alignd", "pair"])
def test_oversized_texts_are_refused_before_tokenization(serve, monkeypatch, format):
    server = serve("reward", scorers=[f"oracle={SCORER}"], model_format=format)
    tokenizer = server.server.services[0].scorers["default"].loaded.tokenizer
    encoded: list[int] = []  # lengths of the texts the tokenizer was given
    encode, call = tokenizer.encode, type(tokenizer).__call__
    tokenizer.encode = lambda text, **kw: encoded.append(len(text)) or encode(text, **kw)

    def spy(self, *texts, **kw):
        encoded.extend(len(t) for t in texts if isinstance(t, str))
        return call(self, *texts, **kw)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    with RewardClient(server.target) as client:
        limit = client.info().server.limits.max_text_bytes
        for scorer in ("default", "oracle"):
            message = rf"items\[0\]\.response: is more than {limit} bytes"
            with pytest.raises(InvalidArgumentError, match=message):
                client.score(["a prompt"], [HUGE], scorer=scorer)
            with pytest.raises(InvalidArgumentError, match=r"items\[0\]\.prompt: is more than"):
                client.score([HUGE], ["a response"], scorer=scorer)
        request = reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(prompt="p", response="r", label=HUGE)]
        )
        with pytest.raises(InvalidArgumentError, match=r"items\[0\]\.label: is more than"):
            client._call("Score", request)
        assert client.score(["a prompt"], ["a response"]).shape == (1,)
    assert encoded and max(encoded) < limit  # no oversized text reached the tokenizer


def test_the_sequence_limit_is_clamped_to_the_model_and_one_long_item_fails_alone(serve):
    server = serve("reward", max_sequence_length=600, max_wait_ms=50)  # BERT: 512 positions
    long_response = "the cat sat on the mat " * 120  # > 512 word pieces
    with RewardClient(server.target) as client:
        (scorer,) = client.info().scorers
        assert scorer.limits.max_sequence_length == 512

        def score(responses):
            try:
                return client.score(["a prompt"] * len(responses), responses)
            except AligndError as err:
                return err

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(score, [["fine"], [long_response], ["also fine"], ["ok"]]))
    assert isinstance(results[1], InvalidArgumentError)
    assert "exceed max_length 512" in str(results[1])
    for i in (0, 2, 3):
        assert isinstance(results[i], np.ndarray), results[i]


async def test_a_full_queue_refuses_before_tokenizing(serve, monkeypatch):
    entered, gate, tokenized = threading.Event(), threading.Event(), []
    original_run, original_tokenize = ModelScorer._run, ModelScorer.tokenize

    def gated_run(self, rows):
        entered.set()
        gate.wait(30)
        return original_run(self, rows)

    def counting_tokenize(self, inputs):
        tokenized.append(len(inputs))
        return original_tokenize(self, inputs)

    monkeypatch.setattr(ModelScorer, "_run", gated_run)
    monkeypatch.setattr(ModelScorer, "tokenize", counting_tokenize)
    server = serve("reward", max_queue_size=2, max_batch_size=2, max_wait_ms=0)
    batcher = server.server.services[0].scorers["default"].batcher
    try:
        async with AsyncRewardClient(server.target, retries=1) as client:
            first = asyncio.ensure_future(client.score(["p"], ["computing"]))
            assert await asyncio.to_thread(entered.wait, 30)
            queued = asyncio.ensure_future(client.score(["p", "q"], ["waiting", "too"]))
            await until_queued(batcher, 2)
            with pytest.raises(ResourceExhaustedError, match="max_queue_size 2"):
                await client.score(["p"], ["refused"])
            assert tokenized == [1, 2]  # the refused request was not tokenized
            gate.set()
            assert (await first).shape == (1,) and (await queued).shape == (2,)
    finally:
        gate.set()
