"""What a protocol is to the server: the services it declares, what it is built from, and
the parsing every protocol's converter shares.

A protocol is a class built from a :class:`ProtocolContext` (``Protocol(context)``) that
declares its endpoints (:class:`ServingProtocol`): the gRPC services it serves, each with
its unary methods and its stream methods, and the prefix of its ``method`` metrics label.
``server.app`` registers, counts, traces and health-checks whatever the protocols in its one
list declare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from mnist_client.contract import IMAGE_SHAPE, INPUT_NAME
from server.core import InferenceCore
from server.errors import InvalidArgument
from server.metrics import InferenceStats
from server.rpc import UnaryImpl
from server.settings import Settings
from server.streams import StreamCodec
from server.wire import check_count

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class ProtocolContext:
    """What a protocol is built from: the core it converts to, and the server's facts."""

    core: InferenceCore
    settings: Settings
    serving: Callable[[], bool]  # the server's health: SERVING (a version, not draining)
    stats: InferenceStats  # inference statistics, as Triton's ModelStatistics reports them
    server_version: str  # this package's version


@dataclass(frozen=True)
class Service:
    """One gRPC service a protocol serves: its full name and its methods by name."""

    name: str  # "inference.GRPCInferenceService"
    unary: Mapping[str, UnaryImpl]
    streams: Mapping[str, StreamCodec] = field(default_factory=dict)  # bidirectional ones


class ServingProtocol(Protocol):
    """A protocol's declaration of its endpoints."""

    # before each method name in the ``method`` metrics label ("kserve." -> kserve.ModelInfer)
    label_prefix: str

    def services(self) -> list[Service]:
        """Every service this protocol serves, with its methods."""
        ...


def parse(message_type: type[M], raw: bytes) -> M:
    """``raw`` as a ``message_type``; bytes that are not one are INVALID_ARGUMENT.

    These protocols follow protobuf's rules (unknown fields are ignored), as their own
    servers do; the parse runs in protobuf's C code.
    """
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(
            f"request is not a valid {message_type.DESCRIPTOR.full_name} message"
        ) from None


def image_count(shape: list[int], max_images: int) -> int:
    """N of an input tensor's shape ``[N, 28, 28]``; another shape, or too many images, is
    INVALID_ARGUMENT (before any image is read)."""
    if len(shape) != 3 or shape[1:] != list(IMAGE_SHAPE) or shape[0] < 1:
        shown = shape if len(shape) <= 4 else [*shape[:4], "..."]
        raise InvalidArgument(
            f"input '{INPUT_NAME}' has shape {shown}; a request's shape is [N, 28, 28] with its "
            "image count N >= 1 (-1 stands for any N in the metadata only)"
        )
    check_count(shape[0], max_images)
    return shape[0]
