"""Typed exceptions for failed RPCs, one per status code the services use.

Every client method raises an :class:`AligndError` subclass instead of a raw ``grpc.RpcError``;
``code`` and ``details`` keep the server's status, ``request_id`` the id to grep server logs for.
"""

from __future__ import annotations

import grpc


class AligndError(Exception):
    """A failed RPC."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, method: str = "", request_id: str | None = None) -> None:
        where = f"{method}: " if method else ""
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{where}{self.code.name}: {details}{rid}")
        self.details = details
        self.method = method
        self.request_id = request_id


class InvalidArgumentError(AligndError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(AligndError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(AligndError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(AligndError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AbortedError(AligndError):
    code = grpc.StatusCode.ABORTED


class UnavailableError(AligndError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(AligndError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(AligndError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(AligndError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnimplementedError(AligndError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(AligndError):
    code = grpc.StatusCode.INTERNAL


class CancelledError(AligndError):
    code = grpc.StatusCode.CANCELLED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        AbortedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        InternalError,
        CancelledError,
    )
}


def from_rpc_error(err: grpc.RpcError, method: str = "") -> AligndError:
    """Converts a ``grpc.RpcError`` (sync or aio) into the matching :class:`AligndError`."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    request_id = None
    trailing = getattr(err, "trailing_metadata", None)
    try:
        for key, value in (trailing() if callable(trailing) else None) or ():
            if key == "x-request-id":
                request_id = value
    except Exception:  # metadata is not always available on a failed call
        request_id = None
    cls = _BY_CODE.get(code, AligndError)
    error = cls(details or "", method=method, request_id=request_id)
    if cls is AligndError:
        error.code = code
    return error


def from_status_text(text: str, method: str = "") -> AligndError:
    """The :class:`AligndError` of a status written as ``"CODE_NAME: details"`` (as a
    PushResult's ``error`` is); an unknown name gives an UNKNOWN error with the whole text."""
    name, _, details = text.partition(": ")
    code = grpc.StatusCode.__members__.get(name)
    if code is None:
        return AligndError(text, method=method)
    cls = _BY_CODE.get(code, AligndError)
    error = cls(details, method=method)
    if cls is AligndError:
        error.code = code
    return error
