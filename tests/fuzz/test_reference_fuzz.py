"""ReferenceService under malformed requests: every RPC answers with a bad-input code, never
INTERNAL, and afterwards a valid request gets exactly the answer it got before."""

from __future__ import annotations

import numpy as np
import pytest
from fuzzing import Fuzzer, budgets, check_counts
from hypothesis import strategies as st
from malformed import (
    number,
    prompt_lengths,
    ragged_ids,
    raw_requests,
    requests,
    tokenize_requests,
)

from alignd import ReferenceClient
from alignd.v1 import reference_pb2

SERVICE = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"]
MAX_BATCH = 8
FULL = {"ComputeLogprobs": 1000, "Tokenize": 600, "GetInfo": 100}


def logprob_requests(vocab: int, max_length: int) -> st.SearchStrategy:
    def build(f) -> reference_pb2.ComputeLogprobsRequest:
        ids = ragged_ids(f, vocab, MAX_BATCH, max_length)
        return reference_pb2.ComputeLogprobsRequest(
            input_ids=ids,
            prompt_lengths=prompt_lengths(f, ids),
            return_sums=f.draw(st.booleans()),
            temperature=number(f, 0.01, 100),
        )

    return requests(build)


def answers(client: ReferenceClient) -> list:
    """What valid requests get: log-probs (at two temperatures) and a tokenization."""
    rows, prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], [2, 1]
    tokens = client.tokenize([[{"role": "user", "content": "Hi"}]], ["Hello there"])[0]
    return [
        *client.logprobs(rows, prompts),
        *client.logprobs(rows, prompts, temperature=0.7),
        tokens.input_ids,
        np.asarray(tokens.prompt_length),
    ]


@pytest.mark.parametrize("budget", budgets(FULL))
def test_reference_refuses_malformed_requests_and_answers_valid_ones_unchanged(serve, budget):
    server = serve("reference", max_batch_size=MAX_BATCH, max_wait_ms=1)
    with ReferenceClient(server.target) as client, Fuzzer(server.target, SERVICE) as fuzz:
        info = client.info().server
        vocab, max_length = info.model.vocab_size, info.limits.max_sequence_length
        before = answers(client)
        runs = {
            "ComputeLogprobs": logprob_requests(vocab, max_length),
            "Tokenize": tokenize_requests(vocab, MAX_BATCH),
            "GetInfo": raw_requests(),
        }
        for method, strategy in runs.items():
            fuzz.run(method, strategy, budget[method], together=4)
            for a, b in zip(answers(client), before, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"after fuzzing {method}")
        check_counts(fuzz, budget)
