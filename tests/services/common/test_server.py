"""Server bootstrap: graceful shutdown drains in-flight calls, message-size, RPC and connection
limits, health states."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest

from alignd import ReferenceClient, RewardClient, TrainerClient
from alignd.errors import AligndError, CancelledError, ResourceExhaustedError, UnavailableError
from alignd.v1 import trainer_pb2, trainer_pb2_grpc
from alignd_server.common.batching import COMPUTE
from alignd_server.common.config import ServerSettings
from alignd_server.common.server import Server
from alignd_server.common.testing import ServerThread
from alignd_server.launch import build_server
from alignd_server.reference.config import ReferenceSettings


class SlowTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """GetState sets :attr:`started`, then waits for :attr:`release`: a long in-flight RPC."""

    name = "alignd.v1.TrainerService"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def register(self, server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self, server)

    async def start(self):
        pass

    async def stop(self):
        pass

    async def GetState(self, request, context):
        self.started.set()
        await asyncio.to_thread(self.release.wait, 30)
        return trainer_pb2.TrainerState(step=42)


# How a stopping server turns a new call away: no connection, or cancelled unserved.
REFUSED = (UnavailableError, CancelledError)


def refuses(client: TrainerClient) -> bool:
    """Whether the server refuses a new call (rather than answering it, even NOT_SERVING)."""
    try:
        client.health(timeout=2)
    except REFUSED:
        return True
    return False


def test_graceful_stop_finishes_in_flight_calls_and_refuses_new_ones():
    servicer = SlowTrainer()
    settings = ServerSettings(port=0, metrics_port=-1, grace_s=10)
    thread = ServerThread(Server(settings, [servicer])).start()
    results: list[object] = []

    def slow_call():
        with TrainerClient(thread.target, retries=1) as client:
            try:
                results.append(client.state().step)
            except AligndError as err:
                results.append(err)

    caller = threading.Thread(target=slow_call)
    caller.start()
    assert servicer.started.wait(10)
    stopping = threading.Thread(target=thread.stop, kwargs={"grace": 10})
    stopping.start()
    try:
        with TrainerClient(thread.target, retries=1) as late:
            wait_until(lambda: refuses(late), "the stopping server refusing new calls")
            with pytest.raises(REFUSED):  # not accepting any more (nor holding it)
                late.state(timeout=2)
        assert results == []  # while the first call is still in flight
    finally:
        servicer.release.set()
    caller.join(15)
    stopping.join(15)
    assert results == [42]


def test_messages_over_the_limit_are_rejected_and_the_server_keeps_serving(serve):
    server = serve("reference", max_message_bytes=4 * 1024 * 1024)
    with ReferenceClient(server.target) as client:
        with pytest.raises(ResourceExhaustedError):
            client.tokenize(["x" * (5 * 1024 * 1024)])
        assert len(client.tokenize(["still here"])) == 1


def test_health_is_not_serving_while_the_model_loads(tiny_models):
    """A real reference server whose model load waits for ``gate``."""
    gate = threading.Event()
    settings = ReferenceSettings(port=0, metrics_port=-1, model=str(tiny_models.causal_lm))
    server = build_server("reference", settings)
    service = server.services[0]
    original_start = service.start

    async def gated_start():
        await asyncio.to_thread(gate.wait, 30)
        await original_start()

    service.start = gated_start
    thread = ServerThread(server).start(wait=False)
    try:
        deadline = time.monotonic() + 10
        while server.port == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with ReferenceClient(f"127.0.0.1:{server.port}") as client:
            assert client.health() == "NOT_SERVING"
            gate.set()
            thread.started.result(30)
            assert client.health() == "SERVING"
    finally:
        gate.set()
        thread.stop()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.02)


@contextmanager
def compute_held() -> Iterator[threading.Event]:
    """Occupies the process's compute thread until the yielded event is set (or the block
    ends), so that model RPCs stay in flight."""
    release = threading.Event()
    job = COMPUTE.submit(release.wait, 30)
    try:
        yield release
    finally:
        release.set()
        job.result(30)


def in_flight(thread: ServerThread, method: str) -> float:
    labels = {"grpc_service": "alignd.v1.RewardService", "grpc_method": method}
    return thread.server.metrics.registry.get_sample_value("alignd_rpc_in_flight", labels) or 0


def test_rpcs_beyond_max_concurrent_rpcs_get_resource_exhausted(serve):
    server = serve("reward", max_concurrent_rpcs=1)
    with RewardClient(server.target) as first, RewardClient(server.target) as second:
        with compute_held() as release, concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(first.score, ["Hi"], ["Hello"])
            wait_until(lambda: in_flight(server, "Score") == 1, "the first call in flight")
            with pytest.raises(ResourceExhaustedError):
                second.info(timeout=10)
            release.set()
            assert held.result(30).shape == (1,)
        assert second.info().server.limits.max_batch_size > 0


IDLE_S = 0.3


def wait_until_idle_closed(target: str) -> None:
    """Opens a connection of its own to ``target``, makes no call on it, and waits until the
    server closes it for being idle."""
    states: list[grpc.ChannelConnectivity] = []
    own = [("grpc.use_local_subchannel_pool", 1)]  # not sharing another channel's connection
    with grpc.insecure_channel(target, options=own) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        ready = grpc.ChannelConnectivity.READY
        wait_until(lambda: ready in states, "the idle connection up")
        wait_until(
            lambda: grpc.ChannelConnectivity.IDLE in states[states.index(ready) :],
            "the idle connection closed",
        )


def test_connections_idle_beyond_max_connection_idle_are_closed(serve):
    server = serve("reward", max_connection_idle_s=IDLE_S)
    states: list[grpc.ChannelConnectivity] = []
    channel = grpc.insecure_channel(server.target)
    channel.subscribe(states.append, try_to_connect=True)
    with channel, RewardClient(server.target, channel=channel) as client:
        # A call in flight for longer than the idle limit keeps its connection...
        with compute_held() as release, concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.score, ["Hi"], ["Hello"])
            wait_until(lambda: in_flight(server, "Score") == 1, "the call in flight")
            wait_until_idle_closed(server.target)  # the idle limit has passed since then
            release.set()
            assert held.result(30).shape == (1,)
        connected = states.index(grpc.ChannelConnectivity.READY)
        assert grpc.ChannelConnectivity.IDLE not in states[connected:]
        # ...and without one the server closes it (GOAWAY): the channel goes idle.
        wait_until(
            lambda: grpc.ChannelConnectivity.IDLE in states[connected:], "the connection closed"
        )
        assert client.health() == "SERVING"  # the next call reconnects
