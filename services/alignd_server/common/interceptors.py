"""Server interceptors: observability (request id, logs, metrics), auth, error mapping.

Each interceptor wraps the RPC in an async context manager (:meth:`ScopeInterceptor.scope`),
which works the same for unary and streaming responses. The server installs them outermost
first: observability sees the final status of every call, auth rejections included; the error
interceptor, innermost, turns domain errors into status codes and is the only place that does.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from grpc import aio

from alignd_server.common.auth import TokenVerifier
from alignd_server.common.errors import AligndError, Unauthenticated
from alignd_server.common.metrics import ServerMetrics

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current RPC's id, ``-`` outside RPCs) to log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _metadata(context: aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def split_method(method: str) -> tuple[str, str]:
    """``/alignd.v1.RewardService/Score`` -> (``alignd.v1.RewardService``, ``Score``)."""
    _, service, name = method.split("/", 2)
    return service, name


class ScopeInterceptor(aio.ServerInterceptor):
    """Base: runs every RPC of every kind inside :meth:`scope`."""

    def scope(self, method: str, context: aio.ServicerContext) -> AbstractAsyncContextManager:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        return _wrap(handler, details.method, self.scope)


def _wrap(handler: grpc.RpcMethodHandler, method: str, scope) -> grpc.RpcMethodHandler:
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(method, context):
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result

        behavior, factory = (
            streaming,
            (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            ),
        )
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            async with scope(method, context):
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

        behavior, factory = (
            unary,
            (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            ),
        )
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ObservabilityInterceptor(ScopeInterceptor):
    """Request ids, one log line per RPC, and per-RPC Prometheus metrics.

    The request id comes from the caller's ``x-request-id`` metadata or is generated; it is
    sent back as trailing metadata and attached to every log record of the call.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    @asynccontextmanager
    async def scope(self, method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        service, name = split_method(method)
        rid = _metadata(context, REQUEST_ID_KEY) or uuid.uuid4().hex[:16]
        token = request_id_var.set(rid[:64])
        in_flight = self._metrics.in_flight.labels(service, name)
        in_flight.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            # Trailing, not initial, metadata: sending headers early would commit the call
            # and stop clients from retrying an UNAVAILABLE answer.
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid[:64]),))
            yield
            code = context.code() or grpc.StatusCode.OK
        except aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.UNKNOWN
            raise
        finally:
            seconds = time.perf_counter() - start
            in_flight.dec()
            code = _as_status(code)
            self._metrics.requests.labels(service, name, code.name).inc()
            self._metrics.latency.labels(service, name).observe(seconds)
            level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) and level > 10:
                level = logging.WARNING if code != grpc.StatusCode.INTERNAL else logging.ERROR
            log.log(level, "rpc %s code=%s seconds=%.6f", method, code.name, seconds)
            request_id_var.reset(token)


def _as_status(code: Any) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:  # aio contexts may report the raw integer
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


class AuthInterceptor(ScopeInterceptor):
    """Rejects RPCs without an accepted bearer token with UNAUTHENTICATED; health is exempt."""

    def __init__(
        self, verifier: TokenVerifier, exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)
    ):
        self._verifier = verifier
        self._exempt = exempt_prefixes

    @asynccontextmanager
    async def scope(self, method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        exempt = method.startswith(self._exempt)
        if not exempt and not self._verifier.verify(_metadata(context, "authorization")):
            raise Unauthenticated("missing or invalid bearer token (metadata 'authorization')")
        yield


class ErrorInterceptor(ScopeInterceptor):
    """Maps domain errors to status codes; anything else is a bug and becomes INTERNAL."""

    @asynccontextmanager
    async def scope(self, method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except AligndError as err:
            await context.abort(err.code, err.message, _trailing(context))
        except NotImplementedError:
            _, name = split_method(method)
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{name} is not implemented by this server",
                _trailing(context),
            )
        except aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in %s", method)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error (request id {request_id_var.get()}); see the server log",
                _trailing(context),
            )


def _trailing(context: aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The request id as trailing metadata (abort replaces what was set before)."""
    return ((REQUEST_ID_KEY, request_id_var.get()),)
