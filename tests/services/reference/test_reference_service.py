"""ReferenceService over a real loopback server: exact log-probs, batch invariance, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignd import ReferenceClient
from alignd.errors import InvalidArgumentError
from alignd.tensors import from_numpy, from_ragged
from alignd.v1 import common_pb2, reference_pb2
from alignd_server.common.models import load_causal_lm


def expected_logprobs(path, sequence, prompt_length, temperature=1.0) -> np.ndarray:
    """log_softmax of an in-process forward on the sequence alone, at the completion tokens."""
    model = load_causal_lm(path).model
    with torch.inference_mode():
        logits = model(torch.as_tensor(np.asarray(sequence)[None], dtype=torch.long)).logits[0]
    logprobs = torch.log_softmax(logits.double() / temperature, dim=-1)
    positions = torch.arange(prompt_length - 1, len(sequence) - 1)
    return logprobs[positions, torch.tensor(sequence[prompt_length:])].numpy()


def sequences(vocab: int, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).astype(np.int32) for n in lengths]


def test_logprobs_equal_log_softmax_of_an_in_process_forward(serve, tiny_models):
    server = serve("reference")
    with ReferenceClient(server.target) as client:
        vocab = client.info().server.model.vocab_size
        rows = sequences(vocab, [12, 5, 30])
        prompts = [4, 1, 29]
        got = client.logprobs(rows, prompts)
    for row, p, values in zip(rows, prompts, got, strict=True):
        assert values.dtype == np.float32
        assert values.shape == (len(row) - p,)
        np.testing.assert_allclose(
            values, expected_logprobs(tiny_models.causal_lm, row, p), atol=1e-5
        )


def test_temperature_divides_the_logits(serve, tiny_models):
    server = serve("reference")
    with ReferenceClient(server.target) as client:
        rows = sequences(client.info().server.model.vocab_size, [10, 6])
        got = client.logprobs(rows, [3, 2], temperature=0.7)
        with pytest.raises(
            InvalidArgumentError, match=r"temperature: must be in \[0\.01, 100\], got 0\.0"
        ):
            client.logprobs(rows, [3, 2], temperature=0.0)
    for row, p, values in zip(rows, [3, 2], got, strict=True):
        expected = expected_logprobs(tiny_models.causal_lm, row, p, temperature=0.7)
        np.testing.assert_allclose(values, expected, atol=1e-5)


def test_info_lists_the_end_tokens(serve):
    with ReferenceClient(serve("reference").target) as client:
        model = client.info().server.model
    assert list(model.eos_token_ids) == [2]  # <|im_end|> of the ChatML tokenizer


def test_logprobs_do_not_depend_on_batch_composition(serve):
    server = serve("reference", max_wait_ms=20)
    with ReferenceClient(server.target) as client:
        vocab = client.info().server.model.vocab_size
        target = sequences(vocab, [20], seed=1)[0]
        alone = client.logprobs([target], [6])[0]
        for lengths in ([90, 120, 100], [3, 4, 2]):
            others = sequences(vocab, lengths, seed=2)
            batch = [others[0], target, *others[1:]]
            got = client.logprobs(batch, [1, 6, 1, 1])[1]
            np.testing.assert_allclose(got, alone, atol=1e-5)


def test_sums_are_the_row_sums(serve):
    server = serve("reference")
    with ReferenceClient(server.target) as client:
        rows = sequences(client.info().server.model.vocab_size, [8, 9])
        request = reference_pb2.ComputeLogprobsRequest(
            input_ids=from_ragged(rows, common_pb2.DTYPE_INT32), prompt_lengths=[2, 3],
            return_sums=True,
        )  # fmt: skip
        response = client._call("ComputeLogprobs", request)
        values = client.logprobs(rows, [2, 3])
    np.testing.assert_allclose(response.sums, [v.sum(dtype=np.float64) for v in values], atol=1e-6)


def test_large_client_batches_are_split(serve):
    server = serve("reference", max_batch_size=3)
    with ReferenceClient(server.target) as client:
        rows = sequences(client.info().server.model.vocab_size, range(4, 14))
        together = client.logprobs(rows, [2] * 10)
        single = [client.logprobs([r], [2])[0] for r in rows]
    for a, b in zip(together, single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


FLOAT32 = common_pb2.DTYPE_FLOAT32


def ragged(rows, dtype=common_pb2.DTYPE_INT32):
    return from_ragged([np.asarray(r) for r in rows], dtype)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (reference_pb2.ComputeLogprobsRequest(), r"input_ids\.values: must be set"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([])),
         r"input_ids\.lengths: must not be empty"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5, 6, 7]]), prompt_lengths=[1, 1]),
         r"prompt_lengths: has 2 values for 1 sequences"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5, 6, 7]]), prompt_lengths=[3]),
         r"prompt_lengths\[0\]: 3 must be in \[1, 2\]"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5, 6, 7]]), prompt_lengths=[0]),
         r"prompt_lengths\[0\]"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5, 6], [5, 99999]]),
                                              prompt_lengths=[1, 1]),
         r"input_ids\[1\]: token id 99999 is outside \[0, "),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5, -1]]), prompt_lengths=[1]),
         r"input_ids\[0\]: token id -1"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5]]), prompt_lengths=[1]),
         r"input_ids\[0\]: 1 tokens, must be 2 \.\. max_sequence_length 512"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5] * 2049]), prompt_lengths=[1]),
         r"input_ids\[0\]: 2049 tokens"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5, 6]] * 65),
                                              prompt_lengths=[1] * 65),
         r"65 sequences exceed max_batch_size 64"),
        (reference_pb2.ComputeLogprobsRequest(input_ids=ragged([[5.0, 6.0]], FLOAT32),
                                              prompt_lengths=[1]),
         r"input_ids\.values\.dtype: must be DTYPE_INT32"),
        (reference_pb2.ComputeLogprobsRequest(
            input_ids=common_pb2.RaggedTensor(values=from_numpy(np.arange(3, dtype=np.int32)),
                                              lengths=[2, 2]), prompt_lengths=[1, 1]),
         r"input_ids: lengths: sum to 4, but values has 3"),
    ],
)  # fmt: skip
def test_bad_requests_are_invalid_arguments_naming_the_field(serve, request_, message):
    server = serve("reference")
    with ReferenceClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=message):
            client._call("ComputeLogprobs", request_)
