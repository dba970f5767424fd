"""Every RPC of every service, in each call shape, through the SDK's sync and asyncio channels,
against servers that require a bearer token: with the token the server lets the call through
(whatever the empty request then gets), without it the answer is UNAUTHENTICATED."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory

from alignd import AsyncGenerationClient, GenerationClient, SamplingParams
from alignd.channel import create_aio_channel, create_channel
from alignd.v1 import generation_pb2, reference_pb2, reward_pb2, trainer_pb2

TOKEN = "call-shapes-token"
SERVICES = {
    "generation": generation_pb2.DESCRIPTOR.services_by_name["GenerationService"],
    "reward": reward_pb2.DESCRIPTOR.services_by_name["RewardService"],
    "reference": reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"],
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
}
SHAPES = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


@pytest.fixture
def servers(serve, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    return {role: serve(role, auth_token_file=str(tokens)) for role in SERVICES}


def methods(role: str):
    for method in SERVICES[role].methods:
        shape = SHAPES[(method.client_streaming, method.server_streaming)]
        request = message_factory.GetMessageClass(method.input_type)()
        response = message_factory.GetMessageClass(method.output_type)
        path = f"/{SERVICES[role].full_name}/{method.name}"
        yield method, shape, request, path, response


def test_the_api_uses_every_call_shape_but_bidirectional_streams():
    shapes = {shape for role in SERVICES for _, shape, *_ in methods(role)}
    assert shapes == {"unary_unary", "unary_stream", "stream_unary"}


def start(channel, shape, request, path, response):
    """The call, started on ``channel`` with ``request`` (in a stream for stream requests)."""
    call = getattr(channel, shape)(
        path, request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )  # fmt: skip
    return call(iter([request]) if shape.startswith("stream") else request, timeout=30)


def sync_code(channel, shape, *call) -> grpc.StatusCode:
    try:
        result = start(channel, shape, *call)
        if shape.endswith("_stream"):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def async_code(channel, shape, *call) -> grpc.StatusCode:
    try:
        result = start(channel, shape, *call)
        if shape.endswith("_stream"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", list(SERVICES))
def test_sync_channels_authenticate_every_call_shape(servers, role):
    target = servers[role].target
    with (
        create_channel(target, token=TOKEN, retries=1) as good,
        create_channel(target, retries=1) as anonymous,
    ):
        for method, *call in methods(role):
            assert sync_code(good, *call) != grpc.StatusCode.UNAUTHENTICATED, method.name
            assert sync_code(anonymous, *call) == grpc.StatusCode.UNAUTHENTICATED, method.name


@pytest.mark.parametrize("role", list(SERVICES))
async def test_asyncio_channels_authenticate_every_call_shape(servers, role):
    target = servers[role].target
    async with create_aio_channel(target, token=TOKEN, retries=1) as good:
        async with create_aio_channel(target, retries=1) as anonymous:
            for method, *call in methods(role):
                code = await async_code(good, *call)
                assert code != grpc.StatusCode.UNAUTHENTICATED, method.name
                code = await async_code(anonymous, *call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, method.name


async def test_the_streaming_client_methods_authenticate(servers):
    target = servers["generation"].target
    update = {"model.norm.weight": np.ones(64, np.float32)}
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with GenerationClient(target, token=TOKEN) as client:
        assert len([m for m in client.stream("hi", params) if m.token_ids.data]) == 3
        assert client.update_weights(update, 1, partial=True).version == 1
    async with AsyncGenerationClient(target, token=TOKEN) as client:
        assert len([m async for m in client.stream("hi", params) if m.token_ids.data]) == 3
        assert (await client.update_weights(update, 2, partial=True)).version == 2
