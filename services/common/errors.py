"""Exceptions that service code raises to answer with a specific gRPC status.

The error interceptor maps them to status codes with their message; any other exception
becomes INTERNAL with a generic message and the request id (the stack trace goes to the
log, never to the caller).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base: an error whose message is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """The request is malformed (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """A named entity does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    """No or an invalid credential (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The credential may not do this (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    """A limit or quota is exceeded (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A dependency or the model is not available right now (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    """The system is not in a state to do this (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    """The work could not finish in time (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def require(condition: bool, message: str) -> None:
    """Raise :class:`InvalidArgument` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvalidArgument(message)


class Cancelled(ServiceError):
    """The call ended (cancelled by its caller, or past its deadline) before the
    handler answered (CANCELLED; the caller no longer waits for it)."""

    code = grpc.StatusCode.CANCELLED
