"""What every protocol translation needs: the served model by name and version, and parsing."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from mnist_client.contract import IMAGE_SHAPE, INPUT_NAME
from server.errors import InvalidArgument, NotFound, quoted
from server.manager import ModelManager
from server.versions import LoadedModel
from server.wire import check_count

M = TypeVar("M", bound=Message)


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


class ServedModel:
    """The one model this server serves, as the protocols name it."""

    def __init__(self, manager: ModelManager, name: str) -> None:
        self._manager = manager
        self.name = name

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model when ``name`` (and ``version``, if given) is what is served.

        Raises:
            NotFound: another model or version was asked for.
            Unavailable: no version is loaded yet.
        """
        if name != self.name:
            raise NotFound(
                f"model {quoted(name)} is not served here; this server serves '{self.name}'"
            )
        model = self._manager.serving_model()
        if version and version != str(model.version):
            raise NotFound(
                f"version {quoted(version)} of model '{name}' is not served; "
                f"version {model.version} is"
            )
        return model
