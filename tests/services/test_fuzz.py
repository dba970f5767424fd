"""Random malformed requests at live servers: never INTERNAL, and the server still answers
correctly afterwards."""

from __future__ import annotations

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignd import ReferenceClient, RewardClient
from alignd.v1 import common_pb2, reference_pb2, reward_pb2

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

texts = st.one_of(st.just(""), st.text(max_size=40), st.text(min_size=2000, max_size=3000))
messages = st.lists(
    st.builds(common_pb2.ChatMessage, role=st.sampled_from(["", "user", "system", "x"]),
              content=texts),
    max_size=3,
)  # fmt: skip


@st.composite
def score_items(draw):
    item = reward_pb2.ScoreItem(response=draw(texts))
    kind = draw(st.sampled_from(["prompt", "chat", "none"]))
    if kind == "prompt":
        item.prompt = draw(texts)
    elif kind == "chat":
        item.chat.messages.extend(draw(messages))
    if draw(st.booleans()):
        item.label = draw(texts)
    return item


score_requests = st.builds(
    reward_pb2.ScoreRequest,
    items=st.lists(score_items(), max_size=70),
    scorer=st.sampled_from(["", "default", "missing", "\x00"]),
)

dtypes = st.sampled_from([common_pb2.DTYPE_INT32, common_pb2.DTYPE_INT64, common_pb2.DTYPE_FLOAT32,
                          common_pb2.DTYPE_UINT8, common_pb2.DTYPE_UNSPECIFIED, 42])  # fmt: skip


@st.composite
def logprob_requests(draw):
    lengths = draw(st.lists(st.integers(-3, 40), max_size=8))
    dtype = draw(dtypes)
    shape = draw(st.lists(st.integers(-1, 60), min_size=0, max_size=2))
    if draw(st.booleans()):  # consistent values, random ids
        count = sum(max(n, 0) for n in lengths)
        ids = draw(st.lists(st.integers(-5, 600), min_size=count, max_size=count))
        values = common_pb2.Tensor(dtype=common_pb2.DTYPE_INT32, shape=[count],
                                   data=np.asarray(ids, dtype="<i4").tobytes())  # fmt: skip
    else:
        values = common_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))
    prompts = draw(st.lists(st.integers(-2, 45), max_size=9))
    return reference_pb2.ComputeLogprobsRequest(
        input_ids=common_pb2.RaggedTensor(values=values, lengths=lengths),
        prompt_lengths=prompts, return_sums=draw(st.booleans()),
    )  # fmt: skip


def call_code(client, method: str, request) -> grpc.StatusCode:
    try:
        getattr(client._stub, method)(request, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_reward_survives_random_requests(serve):
    server = serve("reward")
    with RewardClient(server.target, retries=1) as client:
        before = client.score(["a prompt"], ["a response"])

        @FUZZ
        @given(score_requests)
        def fire(request):
            code = call_code(client, "Score", request)
            assert code in ALLOWED, code

        fire()
        np.testing.assert_array_equal(client.score(["a prompt"], ["a response"]), before)


def test_reference_survives_random_requests(serve):
    server = serve("reference")
    with ReferenceClient(server.target, retries=1) as client:
        before = client.logprobs([[5, 6, 7, 8]], [2])[0]

        @FUZZ
        @given(logprob_requests())
        def fire(request):
            code = call_code(client, "ComputeLogprobs", request)
            assert code in ALLOWED, code

        fire()
        np.testing.assert_array_equal(client.logprobs([[5, 6, 7, 8]], [2])[0], before)
