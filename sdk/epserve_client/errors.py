"""Typed errors: one exception class per gRPC status the API uses, with the server's message verbatim.

Every failure of a call raises an :class:`EpserveError` (or a subclass), whether it came as a gRPC
status or as an ``error`` message inside the ``Generate`` stream. ``str(error)`` is the server's
message exactly as sent; the status is in ``error.code``.
"""
from __future__ import annotations

import grpc

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class EpserveError(Exception):
    """A failed call: ``code`` (a ``grpc.StatusCode``), the server's ``message``, and the
    ``request_id`` of the request when one is known (given by the caller or seen in the stream)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, request_id={self.request_id!r})"


class InvalidArgument(EpserveError):
    """The request was rejected; the message names the offending field."""


class ResourceExhausted(EpserveError):
    """The cluster is at capacity (queue full, KV cache exhausted); retry later."""


class DeadlineExceeded(EpserveError):
    """The call's ``timeout`` expired before it finished."""


class Unavailable(EpserveError):
    """The server could not be reached or had no replica, after every retry."""


class Cancelled(EpserveError):
    """The call was cancelled (by the caller, or by the server on abort)."""


class NotFound(EpserveError):
    """The named request (or other entity) does not exist."""


_CLASSES = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` with integer ``value`` (as in the ``Error.code`` field); UNKNOWN if none."""
    return _CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def error_for(code: grpc.StatusCode, message: str, request_id: str | None = None) -> EpserveError:
    """The typed exception for ``code`` (the base class for codes without a subclass)."""
    return _CLASSES.get(code, EpserveError)(code, message, request_id)


def error_from_rpc(error: grpc.RpcError, request_id: str | None = None) -> EpserveError:
    """Converts a ``grpc.RpcError`` (sync or ``grpc.aio``) raised by a call into its typed exception."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    return error_for(code, details or "", request_id)
