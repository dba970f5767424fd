"""gRPC server bootstrap shared by every service.

:class:`Server` binds a ``grpc.aio`` server with the interceptor chain, standard health
checking (one status per service name), server reflection, TLS or mutual TLS, keepalive and
message-size limits, and a Prometheus endpoint on its own port. The server listens first and
reports NOT_SERVING while its services load their models, then SERVING; on SIGTERM it reports
NOT_SERVING again, stops accepting, and gives in-flight RPCs ``grace_s`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from alignd_server.common.auth import TokenVerifier, load_tokens
from alignd_server.common.config import ServerSettings
from alignd_server.common.health import NOT_SERVING, SERVING, HealthServicer
from alignd_server.common.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    ObservabilityInterceptor,
    RequestIdFilter,
)
from alignd_server.common.memory import trim_interval, trim_periodically
from alignd_server.common.metrics import ServerMetrics

log = logging.getLogger(__name__)


@runtime_checkable
class Service(Protocol):
    """One gRPC service hosted by a :class:`Server`."""

    #: Fully-qualified service name, e.g. ``alignd.v1.RewardService``.
    name: str

    def register(self, server: aio.Server) -> None:
        """Adds the servicer to ``server``."""

    async def start(self) -> None:
        """Loads what the service needs (models); the service reports SERVING after this."""

    async def stop(self) -> None:
        """Releases resources after the server stopped."""


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS with ``tls_client_ca``) credentials, or None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:  # grpc reports a bad pair only as "failed to bind": check it here, naming the files
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.tls_cert, settings.tls_key
        )
    except (OSError, ssl.SSLError) as err:
        raise ValueError(
            f"tls_cert {settings.tls_cert} and tls_key {settings.tls_key} are not a usable "
            f"certificate and key pair: {err}"
        ) from err
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Server channel arguments: message and stream limits, connection lifetimes, keepalive,
    no silent port sharing. The connection limits bound what a client that never finishes a
    message can hold: at most max_concurrent_streams x max_message_bytes per connection, for
    at most max_connection_age_s + max_connection_age_grace_s."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_idle_s is not None:
        options.append(("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_s)))
    if settings.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)))
        grace = _ms(settings.max_connection_age_grace_s)
        options.append(("grpc.max_connection_age_grace_ms", grace))
    return options


def _ms(seconds: float) -> int:
    return max(1, min(int(seconds * 1000), 2**31 - 1))


class Server:
    """A running gRPC server hosting one or more services.

    Args:
        settings: network, limit and security settings.
        services: the services to host.
        metrics: the process's metrics (created when not given); services may register their
            own metrics on ``metrics.registry`` before the server starts.
    """

    def __init__(
        self,
        settings: ServerSettings,
        services: Sequence[Service],
        metrics: ServerMetrics | None = None,
    ) -> None:
        if not services:
            raise ValueError("a server needs at least one service")
        self.settings = settings
        self.services = list(services)
        self.metrics = metrics or ServerMetrics(self.services[0].name)
        self.health = HealthServicer()
        self.started_at = time.time()
        self.port = 0
        self.metrics_port = -1
        self._server: aio.Server | None = None
        self._trimming: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    @property
    def tls(self) -> bool:
        return self.settings.tls_cert is not None

    @property
    def auth_required(self) -> bool:
        return self.settings.auth_token_file is not None

    def _interceptors(self) -> list[aio.ServerInterceptor]:
        chain: list[aio.ServerInterceptor] = [ObservabilityInterceptor(self.metrics)]
        chain.append(ErrorInterceptor())
        if self.settings.auth_token_file is not None:
            chain.append(AuthInterceptor(TokenVerifier(load_tokens(self.settings.auth_token_file))))
        return chain

    async def start(self) -> None:
        """Binds and starts the server, then starts each service (models load here)."""
        server = aio.server(
            interceptors=self._interceptors(),
            options=channel_options(self.settings),
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [s.name for s in self.services]
        for service in self.services:
            service.register(server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        for name in ["", *names]:
            await self.health.set(name, NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        await server.start()
        self._server = server
        if self.settings.metrics_port >= 0:
            where = f"{self.settings.metrics_host}:{self.settings.metrics_port}"
            try:
                self.metrics_port = self.metrics.serve_http(
                    self.settings.metrics_host,
                    self.settings.metrics_port,
                    self.settings.metrics_auth_token_file,
                )
            except OSError as err:
                await server.stop(0)
                raise OSError(f"cannot serve metrics on {where}: {err}") from err
        log.info(
            "listening on %s:%d (%s, auth %s), metrics on %s",
            self.settings.host,
            self.port,
            "tls" if self.tls else "plaintext",
            "on" if self.auth_required else "off",
            f"{self.settings.metrics_host}:{self.metrics_port}"
            if self.metrics_port >= 0
            else "off",
        )
        if getattr(self.settings, "deterministic", False):  # model services
            from alignd_server.common.models import use_deterministic_algorithms

            use_deterministic_algorithms()
        interval = trim_interval(self.settings.malloc_trim_interval_s)
        if interval > 0:
            self._trimming = asyncio.create_task(trim_periodically(interval))
        for service in self.services:
            await service.start()
            await self.health.set(service.name, SERVING)
            log.info("%s serving", service.name)
        await self.health.set("", SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, stops accepting RPCs and waits up to ``grace`` seconds."""
        if self._server is None:
            return
        grace = self.settings.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        log.info("shutting down, grace %.1fs", grace)
        await self._server.stop(grace)
        if self._trimming is not None:
            self._trimming.cancel()
        for service in self.services:
            await service.stop()
        self.metrics.close()
        self._server = None
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        """Blocks until :meth:`stop` finished."""
        await self._stopped.wait()


def configure_logging(level: str) -> None:
    """One line per event, with the RPC's request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def serve(server: Server) -> None:
    """Runs ``server`` until SIGTERM or SIGINT, then shuts it down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # raises if a model failed to load
            await stopping
        else:  # signalled while the models load: give up on them
            log.info("signalled during start-up; stopping")
            starting.cancel()
    except BaseException:
        await server.stop(0)
        raise
    finally:
        stopping.cancel()
    await server.stop()


def run(server: Server) -> None:
    """Configures logging and runs ``server`` in a new event loop until it is signalled."""
    configure_logging(server.settings.log_level)
    asyncio.run(serve(server))
