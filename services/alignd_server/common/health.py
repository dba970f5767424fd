"""Standard health checking (``grpc.health.v1``) whose Watch streams end when the server drains.

grpc's own asyncio ``HealthServicer`` keeps every ``Watch`` stream open forever: it reports
NOT_SERVING on shutdown but never returns, so a server with one watcher (Envoy, a mesh
sidecar, a monitoring agent) waited out its whole grace period on SIGTERM with all its work
done. This servicer has the same Check/Watch/set/enter_graceful_shutdown behaviour, and on
drain sends each watcher its final NOT_SERVING and ends the stream with OK.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd_server.common.errors import NotFound

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """One status per service name ("" is the server as a whole)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Event()
        self._draining = False

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        status = self._status.get(request.service)
        if status is None:
            raise NotFound(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context):
        last = None
        while True:
            changed = self._changed  # taken before reading, so no change is missed
            status = self._status.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
                continue  # read again: the status may have changed (a drain) during the write
            if self._draining:
                return
            await changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Sets the status of ``service``; ignored once draining (it stays NOT_SERVING)."""
        if not self._draining:
            self._status[service] = status
            self._notify()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; watchers get it and their streams end."""
        if self._draining:
            return
        self._draining = True
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._notify()
