"""Channel behaviour against real servers: retries on UNAVAILABLE, tokens on asyncio channels."""

from __future__ import annotations

import asyncio
import json

import pytest

from alignd import AsyncReferenceClient, TrainerClient
from alignd.channel import NOT_RETRIED, service_config
from alignd.errors import UnauthenticatedError, UnavailableError
from alignd.v1 import trainer_pb2, trainer_pb2_grpc
from alignd_server.common.config import ServerSettings
from alignd_server.common.errors import Unavailable
from alignd_server.common.server import Server
from alignd_server.common.testing import ServerThread


class FlakyTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls of every method, counting calls."""

    name = "alignd.v1.TrainerService"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    def register(self, server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self):
        pass

    async def stop(self):
        pass

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            raise Unavailable("warming up")

    async def GetState(self, request, context):
        self._count("GetState")
        return trainer_pb2.TrainerState(step=7)

    async def OptimStep(self, request, context):
        self._count("OptimStep")
        return trainer_pb2.OptimStepResponse(step=1)


@pytest.fixture
def flaky():
    servicer = FlakyTrainer(failures=2)
    settings = ServerSettings(port=0, metrics_port=-1, grace_s=0.1)
    with ServerThread(Server(settings, [servicer])) as thread:
        yield thread, servicer


def test_safe_methods_are_retried_on_unavailable(flaky):
    thread, servicer = flaky
    with TrainerClient(thread.target) as client:
        assert client.state().step == 7
    assert servicer.calls["GetState"] == 3


def test_state_changing_methods_are_not_retried(flaky):
    thread, servicer = flaky
    with TrainerClient(thread.target) as client:
        with pytest.raises(UnavailableError, match="warming up"):
            client._call("OptimStep", trainer_pb2.OptimStepRequest())
    assert servicer.calls["OptimStep"] == 1


def test_retries_can_be_disabled(flaky):
    thread, servicer = flaky
    with TrainerClient(thread.target, retries=1) as client:
        with pytest.raises(UnavailableError):
            client.state()
    assert servicer.calls["GetState"] == 1


def test_service_config_names_every_non_retried_method():
    config = json.loads(service_config())
    retried, exempt = config["methodConfig"]
    assert retried["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in exempt
    assert {(n["service"], n["method"]) for n in exempt["name"]} == set(NOT_RETRIED)


def test_async_client_sends_the_token(serve, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("abc\n")
    server = serve("reference", auth_token_file=tokens)

    async def main():
        async with AsyncReferenceClient(server.target, token="abc") as client:
            await client.wait_ready(10)
            info = await client.info()
            rows = await client.tokenize(["hello world"], ["hi"])
        async with AsyncReferenceClient(server.target) as anonymous:
            with pytest.raises(UnauthenticatedError):
                await anonymous.info()
        return info, rows

    info, rows = asyncio.run(main())
    assert info.server.auth_required
    assert rows[0].loss_mask.sum() == len(rows[0].input_ids) - rows[0].prompt_length
