"""Interceptors over a real loopback server: auth, error mapping, metrics, request ids."""

from __future__ import annotations

import grpc
import pytest
from service_metrics import scrape

from alignd import ReferenceClient, RewardClient, TrainerClient
from alignd.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    UnauthenticatedError,
    UnimplementedError,
)
from alignd.v1 import common_pb2, reference_pb2, reward_pb2, reward_pb2_grpc
from alignd_server.common.config import ServerSettings
from alignd_server.common.errors import InvalidArgument
from alignd_server.common.server import Server
from alignd_server.common.testing import ServerThread

TOKEN = "s3cret-token"


def requests_total(samples, method: str, code: str) -> float:
    labels = frozenset(
        {
            "grpc_service": "alignd.v1.ReferenceService",
            "grpc_method": method,
            "grpc_code": code,
        }.items()
    )
    return samples.get(("alignd_rpc_requests_total", labels), 0.0)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# accepted tokens\nold-token\n" + TOKEN + "\n")
    return path


def test_auth_rejects_missing_and_wrong_tokens_and_exempts_health(serve, token_file):
    server = serve("reference", auth_token_file=token_file)
    with ReferenceClient(server.target) as anonymous:
        assert anonymous.health() == "SERVING"  # health is exempt
        with pytest.raises(UnauthenticatedError, match="bearer token"):
            anonymous.info()
    with ReferenceClient(server.target, token="wrong") as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.info()
    for token in (TOKEN, "old-token"):  # every token in the file is accepted (rotation)
        with ReferenceClient(server.target, token=token) as client:
            assert client.info().server.auth_required
    samples = scrape(server)
    assert requests_total(samples, "GetInfo", "UNAUTHENTICATED") == 2
    assert requests_total(samples, "GetInfo", "OK") == 2


def test_token_must_use_the_bearer_scheme(serve, token_file):
    server = serve("reference", auth_token_file=token_file)
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            "/alignd.v1.ReferenceService/GetInfo",
            request_serializer=common_pb2.GetInfoRequest.SerializeToString,
            response_deserializer=reference_pb2.ReferenceInfo.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(common_pb2.GetInfoRequest(), metadata=[("authorization", f"Basic {TOKEN}")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = call(common_pb2.GetInfoRequest(), metadata=[("authorization", f"bearer {TOKEN}")])
        assert ok.server.service == "alignd.v1.ReferenceService"


def test_domain_errors_map_to_status_codes_and_are_counted(serve):
    server = serve("reference")
    with ReferenceClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match="items: must not be empty"):
            client.tokenize([])
        with pytest.raises(InvalidArgumentError, match=r"max_length: 99999 is outside \[1, 512\]"):
            client.tokenize(["hello"], max_length=99999)
        with pytest.raises(InvalidArgumentError, match=r"input_ids\.values: must be set"):
            client._call("ComputeLogprobs", reference_pb2.ComputeLogprobsRequest())
        assert len(client.tokenize(["hello there"])) == 1
    samples = scrape(server)
    assert requests_total(samples, "Tokenize", "INVALID_ARGUMENT") == 2
    assert requests_total(samples, "Tokenize", "OK") == 1
    assert requests_total(samples, "ComputeLogprobs", "INVALID_ARGUMENT") == 1
    latency_count = samples[
        (
            "alignd_rpc_duration_seconds_count",
            frozenset(
                {"grpc_service": "alignd.v1.ReferenceService", "grpc_method": "Tokenize"}.items()
            ),
        )
    ]
    assert latency_count == 3


def test_trainer_before_initialize_is_a_failed_precondition(serve):
    server = serve("trainer")
    with TrainerClient(server.target) as client:
        assert client.state().initialized is False
        with pytest.raises(FailedPreconditionError, match="Initialize"):
            client.tokenize(["hello"])


class BrokenReward(reward_pb2_grpc.RewardServiceServicer):
    """A service whose handlers fail, to exercise the error interceptor."""

    name = "alignd.v1.RewardService"

    def register(self, server):
        reward_pb2_grpc.add_RewardServiceServicer_to_server(self, server)

    async def start(self):
        pass

    async def stop(self):
        pass

    async def GetInfo(self, request, context):
        raise RuntimeError("a bug")

    async def Score(self, request, context):
        raise InvalidArgument("items[3].response", "must not be empty")


class LibraryFailure(BaseException):
    """As torch.distributed.checkpoint's CheckpointException: a BaseException subclass."""


class FailingLibrary(BrokenReward):
    async def Compare(self, request, context):
        raise LibraryFailure("a library's error that is not an Exception")


def test_a_base_exception_from_a_library_is_answered_internal_not_left_hanging():
    settings = ServerSettings(port=0, metrics_port=-1, grace_s=0.1)
    with ServerThread(Server(settings, [FailingLibrary()])) as thread:
        with RewardClient(thread.target, retries=1) as client:
            with pytest.raises(InternalError, match="internal error"):
                client._call("Compare", reward_pb2.CompareRequest(), timeout=60)
            with pytest.raises(InvalidArgumentError):  # and the server goes on serving
                client._call("Score", reward_pb2.ScoreRequest())


def test_unexpected_exceptions_become_internal_with_a_request_id_and_the_server_survives():
    settings = ServerSettings(port=0, metrics_port=-1, grace_s=0.1)
    with ServerThread(Server(settings, [BrokenReward()])) as thread:
        with RewardClient(thread.target) as client:
            with pytest.raises(
                InternalError, match=r"internal error \(request id [0-9a-f]+\)"
            ) as err:
                client.info()
            assert err.value.request_id  # echoed back as trailing metadata
            assert err.value.request_id in str(err.value)
            with pytest.raises(
                InvalidArgumentError, match=r"items\[3\].response: must not be empty"
            ):
                client._call("Score", reward_pb2.ScoreRequest())
            with pytest.raises(UnimplementedError, match="Compare is not implemented"):
                client._call("Compare", reward_pb2.CompareRequest())

            assert client.health() == "SERVING"


def test_request_id_from_the_caller_is_echoed(serve):
    server = serve("reference")
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            "/alignd.v1.ReferenceService/GetInfo",
            request_serializer=common_pb2.GetInfoRequest.SerializeToString,
            response_deserializer=reference_pb2.ReferenceInfo.FromString,
        )
        _, rpc = call.with_call(common_pb2.GetInfoRequest(), metadata=[("x-request-id", "abc123")])
        assert ("x-request-id", "abc123") in tuple(rpc.trailing_metadata())
