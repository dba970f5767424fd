"""Server interceptors: observability (request id, logs, metrics), auth, error mapping.

Each interceptor wraps the RPC in an async context manager (:meth:`ScopeInterceptor.scope`),
which works the same for unary and streaming RPCs. The server installs them outermost first:
observability (which also parses the request bytes, so a malformed message is answered
INVALID_ARGUMENT and counted), then error mapping, then auth. Observability sees the final
status of every call; the error interceptor turns every domain error raised inside it, auth
rejections included, into a status code.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from alignd_server.common.errors import AligndError, InvalidArgument, Unauthenticated
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


def _decoder(method: str, deserializer):
    """Parses request bytes, turning a malformed message into INVALID_ARGUMENT."""

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw) if deserializer else raw
        except Exception as err:
            _, name = split_method(method)
            raise InvalidArgument("request", f"not a valid {name} request message: {err}") from None

    return decode


async def _decoded(requests: AsyncIterator[bytes], decode) -> AsyncIterator[Any]:
    async for raw in requests:
        yield decode(raw)


def _wrap(
    handler: grpc.RpcMethodHandler, method: str, scope, *, decode: bool = False
) -> grpc.RpcMethodHandler:
    """Runs ``handler`` inside ``scope``; with ``decode``, request bytes are parsed inside it
    too, so that even an undecodable message is counted, logged and answered as bad input."""
    parse = _decoder(method, handler.request_deserializer) if decode else None
    inner = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )

    def prepare(request: Any) -> Any:
        if parse is None:
            return request
        return _decoded(request, parse) if handler.request_streaming else parse(request)

    if handler.response_streaming:

        async def behavior(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(method, context):
                result = inner(prepare(request), context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result

    else:

        async def behavior(request: Any, context: aio.ServicerContext) -> Any:
            async with scope(method, context):
                result = inner(prepare(request), context)
                return await result if inspect.isawaitable(result) else result

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=None if decode else handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ObservabilityInterceptor(ScopeInterceptor):
    """Request ids, one log line per RPC, and per-RPC Prometheus metrics.

    The request id comes from the caller's ``x-request-id`` metadata or is generated; it is
    sent back as trailing metadata and attached to every log record of the call.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        return _wrap(handler, details.method, self.scope, decode=True)

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
        except AligndError as err:  # an undecodable request, outside the error interceptor
            code = err.code
            await abort(context, err.code, err.message)
        except aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except GeneratorExit:  # a response stream closed because its caller stopped reading
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            seconds = time.perf_counter() - start
            in_flight.dec()
            code = _as_status(code)
            self._metrics.requests.labels(service, name, code.name).inc()
            self._metrics.latency.labels(service, name).observe(seconds)
            level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
            quiet = (
                grpc.StatusCode.OK,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            if code not in quiet and level > logging.DEBUG:
                level = logging.WARNING if code != grpc.StatusCode.INTERNAL else logging.ERROR
            log.log(level, "rpc %s code=%s seconds=%.6f", method, code.name, seconds)
            # A response stream's generator may be closed from another context (its caller
            # cancelled): there the token is not valid, and nothing of ours is left to reset.
            with contextlib.suppress(ValueError):
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
            await abort(context, err.code, err.message)
        except NotImplementedError:
            if context.code() != grpc.StatusCode.UNIMPLEMENTED:  # not an RPC the server lacks
                log.exception("unhandled error in %s", method)
                await abort(context, grpc.StatusCode.INTERNAL, _internal())
            _, name = split_method(method)
            await abort(
                context, grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server"
            )
        except (aio.AbortError, asyncio.CancelledError, GeneratorExit, KeyboardInterrupt,
                SystemExit):  # fmt: skip
            raise
        except BaseException:  # also libraries' BaseException subclasses (torch's DCP errors)
            if context.cancelled():  # the caller went away; what failed was talking to it
                raise asyncio.CancelledError from None
            log.exception("unhandled error in %s", method)
            await abort(context, grpc.StatusCode.INTERNAL, _internal())


def _internal() -> str:
    return f"internal error (request id {request_id_var.get()}); see the server log"


async def abort(context: aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Ends the RPC with ``code``, the request id in the trailing metadata.

    Raises:
        aio.AbortError: always, as ``context.abort`` does.
        asyncio.CancelledError: the caller is gone (it cancelled, or its deadline passed):
            there is no one to answer, and the call counts as cancelled, not failed.
    """
    if context.cancelled():
        raise asyncio.CancelledError
    try:
        await context.abort(code, message, _trailing(context))
    except aio.AbortError:
        raise
    except Exception:  # the call ended under us: grpc could not send the status
        if context.cancelled() or context.done():
            raise asyncio.CancelledError from None
        raise


def _trailing(context: aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    """The request id as trailing metadata (abort replaces what was set before)."""
    return ((REQUEST_ID_KEY, request_id_var.get()),)
