"""Domain errors raised by service code and mapped to gRPC status codes in one place.

Business logic raises these; :class:`alignd_server.common.interceptors.ErrorInterceptor` turns
them into status codes. Nothing else calls ``context.abort``.
"""

from __future__ import annotations

import grpc


class AligndError(Exception):
    """Base of every error a service reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AligndError):
    """The request is malformed; the message names the field and the limit.

    Args:
        field: dotted path of the offending field, e.g. ``items[3].response``.
        message: what is wrong, e.g. ``must not be empty`` or ``has 9000 tokens, limit 2048``.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(AligndError):
    """A named thing (a scorer, a checkpoint path) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(AligndError):
    """The server is not in a state to serve the call (e.g. no model loaded yet)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AligndError):
    """The server is over capacity (queue full); the caller may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(AligndError):
    """A conflicting operation is in progress (e.g. a concurrent weight update)."""

    code = grpc.StatusCode.ABORTED


class Unavailable(AligndError):
    """The service cannot serve right now (loading, shutting down); retrying is safe."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AligndError):
    """The call's deadline passed before its work ran; the work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(AligndError):
    """The bearer token is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(AligndError):
    """The RPC exists in the API but this server does not implement it."""

    code = grpc.StatusCode.UNIMPLEMENTED
