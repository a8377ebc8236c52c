"""Errors that carry their gRPC status code, raised anywhere on the request path.

The RPC layer (``server.rpc``) turns a :class:`ServiceError` into its status and message; any
other exception becomes INTERNAL with a generic message while the detail goes to the log.
"""

from __future__ import annotations

import grpc

# The longest message a caller is sent: a message names the first problem, never a list of
# them, and it goes in a header (grpc-message) that clients refuse past their metadata limit.
MAX_MESSAGE_CHARS = 300


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    cut = limit - 30
    return f"{text[:cut]}... ({len(text) - cut} more characters)"


def quoted(value: object, limit: int = 64) -> str:
    """A caller's value (a name, a label) quoted for an error message, at most ``limit``
    characters of it."""
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


class ServiceError(Exception):
    """An error a caller can act on: its ``code`` and ``message`` go to the caller (the
    message bounded to :data:`MAX_MESSAGE_CHARS`)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(ServiceError):
    """A bug, answered without its detail (the detail goes to the log)."""

    code = grpc.StatusCode.INTERNAL


class ModelFailed(ServiceError):
    """The model call for a batch raised; every request in that batch gets this status."""

    code = grpc.StatusCode.INTERNAL
