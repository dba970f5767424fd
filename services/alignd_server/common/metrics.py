"""Prometheus metrics of one server process, on their own registry and HTTP port.

Names follow the Prometheus conventions: ``alignd_`` prefix, base units, ``_total`` counters,
``_seconds`` histograms. Each server owns a :class:`ServerMetrics` (and so a registry), which
keeps several servers in one process (tests) apart.

The endpoint is prometheus_client's WSGI app on a threading WSGI server; with a token file,
a small WSGI wrapper asks for ``Authorization: Bearer <token>`` (checked like the gRPC tokens,
in constant time) and answers 401 otherwise: prometheus_client's own server offers TLS but no
token check, and Prometheus sends one with ``authorization: credentials_file``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from alignd import __version__
from alignd_server.common.auth import TokenVerifier, load_tokens

# RPC latencies from a health check (~100 us) to a long generation (minutes).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class ServerMetrics:
    """The per-RPC metrics every server exports, plus process and build information.

    Service-specific metrics register on :attr:`registry` too.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        labels = ["grpc_service", "grpc_method"]
        self.requests = Counter(
            "alignd_rpc_requests",
            "RPCs completed, by method and status code.",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "alignd_rpc_duration_seconds",
            "RPC handling time from the first byte in to the status out.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "alignd_rpc_in_flight", "RPCs being handled now.", labels, registry=self.registry
        )
        self.build = Info("alignd_build", "alignd version and service.", registry=self.registry)
        self.build.info({"version": __version__, "service": service})
        self.start_time = Gauge(
            "alignd_server_start_time_seconds",
            "Unix time the server started.",
            registry=self.registry,
        )
        self.start_time.set(time.time())
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve_http(self, host: str, port: int, token_file: Path | None = None) -> int:
        """Starts the ``/metrics`` endpoint in a background thread; returns its bound port.

        Args:
            host: interface to bind.
            port: port (0 picks one).
            token_file: bearer tokens the endpoint requires (one per line); None = open.
        """
        app = make_wsgi_app(self.registry)
        if token_file is not None:
            app = _require_token(app, TokenVerifier(load_tokens(token_file)))
        self._http = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self._http.server_port

    def close(self) -> None:
        """Stops the HTTP endpoint, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Quiet(WSGIRequestHandler):
    """No access log on stderr: the server logs through ``logging``."""

    def log_message(self, format: str, *args) -> None:
        pass


def _require_token(app: Callable, verifier: TokenVerifier) -> Callable:
    """``app`` behind a bearer-token check."""

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if verifier.verify(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
        )
        return [b"missing or invalid bearer token\n"]

    return guarded
