"""What every client shares: channel, deadlines, error conversion, health."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any, ClassVar, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.channel import TLSConfig, create_aio_channel, create_channel
from alignd.errors import AligndError, from_rpc_error

DEFAULT_TIMEOUT_S = 60.0
C = TypeVar("C")


def with_timeout(client: C, timeout: float) -> C:
    """A client of the same service over the same channel (not closed with it) whose calls
    default to ``timeout`` seconds: the deadline one kind of work needs (a job's trainer
    calls), without a second connection."""
    clone = copy.copy(client)
    clone.timeout = timeout
    clone._owns_channel = False
    return clone


class ClientBase:
    """A sync client of one service.

    Args:
        target: ``host:port`` of the service.
        token: bearer token, when the server requires one.
        tls: TLS settings; None = plaintext.
        timeout: default deadline of each call, in seconds; None = the client's
            :attr:`default_timeout` (60 s; the trainer's compute calls get 30 min).
        channel: an existing channel to use instead of creating one (not closed by this client).
        **channel_args: passed to :func:`alignd.channel.create_channel`.
    """

    service: ClassVar[str]
    stub_class: ClassVar[type]
    default_timeout: ClassVar[float] = DEFAULT_TIMEOUT_S

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLSConfig | None = None,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        **channel_args: Any,
    ) -> None:
        self.target = target
        self.timeout = self.default_timeout if timeout is None else timeout
        self._owns_channel = channel is None
        self._channel = channel or create_channel(target, token=token, tls=tls, **channel_args)
        self._stub = self.stub_class(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"{self.service}/{method}") from None

    def health(self, *, timeout: float = 5.0) -> str:
        """The service's health status name (``SERVING``, ``NOT_SERVING``, ...)."""
        request = health_pb2.HealthCheckRequest(service=self.service)
        try:
            response = self._health.Check(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, "grpc.health.v1.Health/Check") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        """Blocks until the service reports SERVING.

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except AligndError as err:
                last = str(err)
            time.sleep(interval)
        raise TimeoutError(f"{self.service} at {self.target} not SERVING after {timeout}s: {last}")

    def close(self) -> None:
        """Closes the channel (if this client created it)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClientBase:
    """The asyncio twin of :class:`ClientBase` (same arguments); use ``async with``."""

    service: ClassVar[str]
    stub_class: ClassVar[type]
    default_timeout: ClassVar[float] = DEFAULT_TIMEOUT_S

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLSConfig | None = None,
        timeout: float | None = None,
        channel: aio.Channel | None = None,
        **channel_args: Any,
    ) -> None:
        self.target = target
        self.timeout = self.default_timeout if timeout is None else timeout
        self._owns_channel = channel is None
        self._channel = channel or create_aio_channel(target, token=token, tls=tls, **channel_args)
        self._stub = self.stub_class(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, f"{self.service}/{method}") from None

    async def health(self, *, timeout: float = 5.0) -> str:
        """The service's health status name."""
        request = health_pb2.HealthCheckRequest(service=self.service)
        try:
            response = await self._health.Check(request, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err, "grpc.health.v1.Health/Check") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        """Waits until the service reports SERVING (TimeoutError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except AligndError as err:
                last = str(err)
            await asyncio.sleep(interval)
        raise TimeoutError(f"{self.service} at {self.target} not SERVING after {timeout}s: {last}")

    async def close(self) -> None:
        """Closes the channel (if this client created it)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
