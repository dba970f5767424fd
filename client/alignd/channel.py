"""Channel factory: TLS, bearer token, keepalive, message limits, retries, deadlines.

Retries: the gRPC service config retries UNAVAILABLE with exponential backoff on every method
that is safe to repeat. Methods that change trainer or generation state (ForwardBackward,
OptimStep, Initialize, checkpoints, weight updates) are never retried automatically: a job
decides, since the first attempt may have run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

MiB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB

SERVICES = (
    "alignd.v1.GenerationService",
    "alignd.v1.RewardService",
    "alignd.v1.ReferenceService",
    "alignd.v1.TrainerService",
    "grpc.health.v1.Health",
)
# (service, method) pairs whose effects must not be repeated blindly.
NOT_RETRIED = (
    ("alignd.v1.TrainerService", "Initialize"),
    ("alignd.v1.TrainerService", "ForwardBackward"),
    ("alignd.v1.TrainerService", "OptimStep"),
    ("alignd.v1.TrainerService", "SaveCheckpoint"),
    ("alignd.v1.TrainerService", "LoadCheckpoint"),
    ("alignd.v1.TrainerService", "PushWeights"),
    ("alignd.v1.GenerationService", "UpdateWeights"),
    ("alignd.v1.GenerationService", "LoadWeights"),
    ("alignd.v1.GenerationService", "ReceiveWeights"),
)


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings of a client.

    Attributes:
        ca_cert: PEM CA bundle that signed the server certificate; None = system roots.
        client_cert: PEM client certificate, for mutual TLS.
        client_key: PEM key of ``client_cert``.
        server_name: expected server name, when it differs from the target's host.
    """

    ca_cert: Path | str | None = None
    client_cert: Path | str | None = None
    client_key: Path | str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the PEM files."""
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together")

        def read(path: Path | str | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def service_config(max_attempts: int = 5) -> str:
    """gRPC service config JSON: retry UNAVAILABLE on safe methods, never on the others."""
    retry = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps(
        {
            "methodConfig": [
                {"name": [{"service": s} for s in SERVICES], "retryPolicy": retry},
                {"name": [{"service": s, "method": m} for s, m in NOT_RETRIED]},
            ]
        }
    )


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    retries: int = 5,
    server_name: str | None = None,
) -> list[tuple[str, Any]]:
    """Channel arguments for a client channel."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.enable_retries", 1 if retries > 1 else 0),
        ("grpc.service_config", service_config(max(retries, 2))),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a sync channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _AioToken:
    """Adds ``authorization: Bearer <token>`` to the calls of an asyncio channel.

    grpc.aio files each interceptor under the first call shape it implements, so a single
    class implementing all four would only ever see unary-unary calls: one subclass per shape.
    """

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioTokenUnaryUnary(_AioToken, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioTokenUnaryStream(_AioToken, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioTokenStreamUnary(_AioToken, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioTokenStreamStream(_AioToken, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def aio_token_interceptors(token: str) -> list[_AioToken]:
    """Interceptors that send ``token`` on every call shape of an asyncio channel."""
    shapes = (_AioTokenUnaryUnary, _AioTokenUnaryStream, _AioTokenStreamUnary,
              _AioTokenStreamStream)  # fmt: skip
    return [shape(token) for shape in shapes]


def create_channel(
    target: str,
    *,
    token: str | None = None,
    tls: TLSConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    retries: int = 5,
) -> grpc.Channel:
    """A sync channel to an alignd service.

    Args:
        target: ``host:port`` (any gRPC target string).
        token: bearer token sent as ``authorization`` metadata on every call.
        tls: TLS settings; None = plaintext.
        max_message_bytes: largest message sent or received.
        keepalive_time_s: seconds between keepalive pings while calls are active.
        retries: attempts per call for retryable methods on UNAVAILABLE (1 = no retry).
    """
    options = channel_options(
        max_message_bytes=max_message_bytes,
        keepalive_time_s=keepalive_time_s,
        retries=retries,
        server_name=tls.server_name if tls else None,
    )
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, tls.credentials(), options=options)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel


def create_aio_channel(
    target: str,
    *,
    token: str | None = None,
    tls: TLSConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_s: float = 30.0,
    retries: int = 5,
) -> aio.Channel:
    """The asyncio twin of :func:`create_channel` (same arguments)."""
    options = channel_options(
        max_message_bytes=max_message_bytes,
        keepalive_time_s=keepalive_time_s,
        retries=retries,
        server_name=tls.server_name if tls else None,
    )
    interceptors = aio_token_interceptors(token) if token else None
    if tls is None:
        return aio.insecure_channel(target, options=options, interceptors=interceptors)
    return aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors)
