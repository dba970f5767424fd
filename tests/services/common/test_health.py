"""Health checking: per-service statuses, and Watch streams that end when the server drains, so
an open watcher does not hold a stopping server for its whole grace period."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server import SlowTrainer

from alignd.errors import NotFoundError
from alignd_server.common.config import ServerSettings
from alignd_server.common.server import Server
from alignd_server.common.testing import ServerThread

SERVICE = "alignd.v1.TrainerService"


def test_watch_reports_changes_and_ends_with_ok_when_the_server_drains():
    settings = ServerSettings(port=0, metrics_port=-1, grace_s=3600)
    thread = ServerThread(Server(settings, [SlowTrainer()])).start()
    seen: list[str] = []
    first = threading.Event()
    outcome: list[object] = []

    def watch():
        with grpc.insecure_channel(thread.target) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=600
            )
            try:
                for response in stream:
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                    first.set()
                outcome.append(stream.code())
            except grpc.RpcError as err:
                outcome.append(err.code())

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert first.wait(30)
    stopping = threading.Thread(target=thread.stop, kwargs={"grace": 3600})
    stopping.start()
    # Bounded joins: a watch that never ends would hold stop() for the hour of grace.
    stopping.join(60)
    watcher.join(60)
    assert not stopping.is_alive() and not watcher.is_alive()
    assert seen == ["SERVING", "NOT_SERVING"]
    assert outcome == [grpc.StatusCode.OK]


def test_check_of_an_unknown_service_is_not_found(serve):
    server = serve("reference")
    from alignd import ReferenceClient

    with ReferenceClient(server.target) as client:
        client.service = "no.such.Service"
        try:
            client.health()
        except NotFoundError as err:
            assert "unknown service 'no.such.Service'" in str(err)
        else:
            raise AssertionError("NOT_FOUND expected")
