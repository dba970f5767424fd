"""Interceptors on streaming RPCs, undecodable messages, cancellations and deadlines."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignd import GenerationClient, TrainerClient
from alignd.errors import InternalError, UnimplementedError
from alignd.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from alignd_server.common.config import ServerSettings
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.server import Server
from alignd_server.common.testing import ServerThread

GEN = "alignd.v1.GenerationService"


class StreamingGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Streams two messages; UpdateWeights rejects a chunk without a name."""

    name = GEN

    def register(self, server):
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self, server)

    async def start(self):
        pass

    async def stop(self):
        pass

    async def GenerateStream(self, request, context):
        if request.params.max_new_tokens <= 0:
            raise InvalidArgument("params.max_new_tokens", "must be >= 1")
        for index in range(2):
            yield generation_pb2.GenerateStreamResponse(index=index)
            if request.params.max_new_tokens > 100:
                await asyncio.sleep(10)  # slow: for cancellation and deadlines

    async def UpdateWeights(self, request_iterator, context):
        count = 0
        async for part in request_iterator:
            if part.WhichOneof("part") == "chunk" and not part.chunk.name:
                raise InvalidArgument(f"parts[{count}].chunk.name", "must be set")
            count += 1
        return generation_pb2.UpdateWeightsResponse(tensors_updated=count)


class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
    name = "alignd.v1.TrainerService"

    def register(self, server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self):
        pass

    async def stop(self):
        pass

    async def OptimStep(self, request, context):
        raise NotImplementedError("a missing kernel deep inside torch")


@pytest.fixture
def server(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t0k\n")
    settings = ServerSettings(port=0, metrics_port=0, grace_s=0.1, auth_token_file=tokens)
    with ServerThread(Server(settings, [StreamingGeneration(), Trainer()])) as thread:
        yield thread


def count(thread, method: str, code: str, service: str = GEN) -> float:
    url = f"http://127.0.0.1:{thread.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    want = {"grpc_service": service, "grpc_method": method, "grpc_code": code}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "alignd_rpc_requests_total" and sample.labels == want:
                return sample.value
    return 0.0


def stream(client, params):
    request = generation_pb2.GenerateStreamRequest(params=params)
    return list(client._stub.GenerateStream(request, timeout=30))


def test_streaming_responses_pass_auth_errors_and_metrics(server):
    with GenerationClient(server.target, token="t0k") as client:
        assert [
            m.index for m in stream(client, generation_pb2.SamplingParams(max_new_tokens=1))
        ] == [0, 1]
        with pytest.raises(grpc.RpcError) as err:
            stream(client, generation_pb2.SamplingParams(max_new_tokens=0))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "params.max_new_tokens" in err.value.details()
    with GenerationClient(server.target) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            stream(anonymous, generation_pb2.SamplingParams(max_new_tokens=1))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert count(server, "GenerateStream", "OK") == 1
    assert count(server, "GenerateStream", "INVALID_ARGUMENT") == 1
    assert count(server, "GenerateStream", "UNAUTHENTICATED") == 1


def test_client_streams_pass_errors_and_metrics(server):
    header = generation_pb2.WeightsHeader(version=1)
    chunk = generation_pb2.TensorChunk(name="w")
    good = [generation_pb2.UpdateWeightsRequest(header=header),
            generation_pb2.UpdateWeightsRequest(chunk=chunk)]  # fmt: skip
    bad = [*good, generation_pb2.UpdateWeightsRequest(chunk=generation_pb2.TensorChunk())]
    with GenerationClient(server.target, token="t0k") as client:
        assert client._stub.UpdateWeights(iter(good), timeout=10).tensors_updated == 2
        with pytest.raises(grpc.RpcError) as err:
            client._stub.UpdateWeights(iter(bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parts[2].chunk.name" in err.value.details()
    assert count(server, "UpdateWeights", "INVALID_ARGUMENT") == 1


def test_undecodable_messages_are_invalid_arguments_and_counted(server):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary(f"/{GEN}/GetInfo")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", metadata=[("authorization", "Bearer t0k")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request: not a valid GetInfo request message" in err.value.details()
        raw_stream = channel.stream_unary(f"/{GEN}/UpdateWeights")
        with pytest.raises(grpc.RpcError) as err:
            raw_stream(iter([b"\x0a\xff"]), metadata=[("authorization", "Bearer t0k")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert count(server, "GetInfo", "INVALID_ARGUMENT") == 1


def test_deadlines_and_cancellations_are_counted_as_such(server):
    slow = generation_pb2.GenerateStreamRequest(
        params=generation_pb2.SamplingParams(max_new_tokens=1000)
    )
    with GenerationClient(server.target, token="t0k") as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client._stub.GenerateStream(slow, timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = client._stub.GenerateStream(slow, timeout=30)
        next(call)
        call.cancel()
    # The server counts a call when it has seen it end, after the client did.
    recorded = {"DEADLINE_EXCEEDED": 1, "CANCELLED": 1}
    for _ in range(200):
        if all(count(server, "GenerateStream", c) == n for c, n in recorded.items()):
            break
        time.sleep(0.05)
    for code, n in recorded.items():
        assert count(server, "GenerateStream", code) == n, code
    assert count(server, "GenerateStream", "UNKNOWN") == 0


def test_not_implemented_error_from_code_is_internal_but_missing_rpcs_are_unimplemented(server):
    with TrainerClient(server.target, token="t0k") as client:
        with pytest.raises(InternalError):
            client._call("OptimStep", trainer_pb2.OptimStepRequest())
        with pytest.raises(UnimplementedError, match="ForwardBackward is not implemented"):
            client._call("ForwardBackward", trainer_pb2.ForwardBackwardRequest())
