"""The ``mnist.v1`` wire format on the request path: strict reading, direct writing.

Requests are read straight from their bytes, without building protobuf objects, for two
reasons:

* **Hostile bodies.** Unknown fields are skipped, as proto3 wants (a caller built from a newer
  ``.proto`` keeps working), but at most :data:`MAX_UNKNOWN_FIELDS` of them: a body of a
  million unknown fields is refused after the first few, without building protobuf's
  ``UnknownFieldSet`` (work and memory proportional to the body, on the event loop). A
  known field with the wrong wire type, a repeated singular field or a malformed byte stops
  the reading at once, so refusing a hostile 8 MiB body costs the same as a 3-byte one.
* **Cost per request.** A well-formed Predict body is exactly 787 bytes (tag, length 784,
  pixels); recognising it is one comparison, and its pixels are used in place. A BatchPredict
  of 784-byte images is checked with one vectorised numpy comparison.

Responses are written directly too: a PredictResponse is the digit, 40 bytes of little-endian
float32 and the version, joined. Every encoder here gives exactly the bytes protobuf's
``SerializeToString`` gives for the same message (the tests check it), and every parser gives
the same values protobuf's parser does for any message it accepts.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mnist_client.contract import IMAGE_BYTES, IMAGE_SHAPE, NUM_CLASSES
from server.errors import InvalidArgument

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# unknown fields skipped in one message before it is refused: enough for any newer .proto,
# too few for a body of unknown fields to cost more than a glance
MAX_UNKNOWN_FIELDS = 64
_WIRE_NAMES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group", 4: "group", 5: "32-bit"}
_LITTLE_F32 = np.dtype("<f4")


def float32_le(values: np.ndarray) -> bytes:
    """``values`` as little-endian float32 bytes, the wire form of every protocol's output."""
    return values.astype(_LITTLE_F32, copy=False).tobytes()


# one image as protobuf writes it: tag of field 1 (length-delimited), varint 784, the pixels
_IMAGE_TAG = b"\x0a"
_IMAGE_HEADER = _IMAGE_TAG + bytes([0x90, 0x06])  # varint(784)
_IMAGE_ENTRY = len(_IMAGE_HEADER) + IMAGE_BYTES  # 787
_IMAGE_HEADER_ARRAY = np.frombuffer(_IMAGE_HEADER, np.uint8)


def varint(value: int) -> bytes:
    """``value`` (>= 0, < 2**64) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_UINT64 = (1 << 64) - 1


def read_varint(data: bytes, pos: int, message: str) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it; a bad one is INVALID_ARGUMENT."""
    result = shift = 0
    end = min(len(data), pos + 10)
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _UINT64, pos  # bits past 64 are dropped, as protobuf does
        shift += 7
    raise InvalidArgument(f"request is not a valid mnist.v1.{message} message")


class Fields:
    """The fields of one flat message type: number -> (name, wire type)."""

    def __init__(self, message: str, fields: dict[int, tuple[str, int]]) -> None:
        self.message = message
        self.fields = fields

    def scan(
        self, data: bytes, on_field: Callable[[int, int, int, int], None], pos: int = 0
    ) -> None:
        """Walk ``data`` from ``pos``, calling ``on_field(number, value, start, end)`` for each
        field (positions in ``data``).

        A varint field gives its ``value``; a length-delimited one its bytes ``data[start:end]``.
        Unknown fields are skipped (up to :data:`MAX_UNKNOWN_FIELDS`); a known field with the
        wrong wire type or a malformed byte stops the walk with INVALID_ARGUMENT, so a
        hostile body costs only as much as its first problem.
        """
        n = len(data)
        unknown = 0
        while pos < n:
            key, pos = read_varint(data, pos, self.message)
            number, wire = key >> 3, key & 7
            spec = self.fields.get(number)
            if not 0 < number < 1 << 29:  # no field has such a number: protobuf refuses it too
                raise InvalidArgument(f"request is not a valid mnist.v1.{self.message} message")
            if spec is None:
                unknown += 1
                if unknown > MAX_UNKNOWN_FIELDS:
                    raise InvalidArgument(
                        f"more than {MAX_UNKNOWN_FIELDS} unknown fields in {self.message} "
                        f"(field number {number}); this server speaks mnist.v1"
                    )
                pos = self._skip(data, pos, number, wire)
                continue
            if wire != spec[1]:
                raise InvalidArgument(
                    f"{self.message}.{spec[0]} (field {number}) has the wrong type "
                    f"({_WIRE_NAMES.get(wire, str(wire))})"
                )
            if wire == _VARINT:
                value, pos = read_varint(data, pos, self.message)
                on_field(number, value, pos, pos)
            else:
                length, start = read_varint(data, pos, self.message)
                pos = start + length
                if pos > n:
                    raise InvalidArgument(f"request is not a valid mnist.v1.{self.message} message")
                on_field(number, length, start, pos)

    def _skip(self, data: bytes, pos: int, number: int, wire: int) -> int:
        """The position after an unknown field's value (which starts at ``pos``)."""
        if wire == _VARINT:
            return read_varint(data, pos, self.message)[1]
        if wire == _LEN:
            length, pos = read_varint(data, pos, self.message)
            end = pos + length
        elif wire in (_I64, _I32):
            end = pos + (8 if wire == _I64 else 4)
        else:  # groups (3, 4) do not exist in proto3; 6 and 7 are no wire type at all
            raise InvalidArgument(
                f"field {number} in {self.message} has wire type "
                f"{_WIRE_NAMES.get(wire, str(wire))}, which proto3 has not"
            )
        if end > len(data):
            raise InvalidArgument(f"request is not a valid mnist.v1.{self.message} message")
        return end


PREDICT_REQUEST = Fields("PredictRequest", {1: ("image", _LEN), 2: ("model_spec", _LEN)})
BATCH_PREDICT_REQUEST = Fields(
    "BatchPredictRequest", {1: ("images", _LEN), 2: ("model_spec", _LEN)}
)
MODEL_INFO_REQUEST = Fields("GetModelInfoRequest", {1: ("model_spec", _LEN)})
STREAM_REQUEST = Fields(
    "PredictStreamRequest", {1: ("id", _VARINT), 2: ("image", _LEN), 3: ("model_spec", _LEN)}
)
MODEL_SPEC = Fields("ModelSpec", {1: ("name", _LEN), 2: ("version", _VARINT), 3: ("label", _LEN)})
_MODEL_SPEC_FIELD = 2  # in PredictRequest and BatchPredictRequest


class Pin(NamedTuple):
    """A request's ModelSpec: which model, version or label answers it (None: not set)."""

    model: str | None
    version: int | None
    label: str | None


def parse_model_spec(data: bytes) -> Pin | None:
    """A ModelSpec message's pin; None when it sets nothing (the default answers)."""
    name = label = None
    version: int | None = None
    seen: set[int] = set()

    def on_field(number: int, value: int, start: int, end: int) -> None:
        nonlocal name, version, label
        _once(seen, number, MODEL_SPEC)
        if number == 2:
            version = value - (1 << 64) if value >= 1 << 63 else value  # int64, two's complement
            return
        try:
            text = data[start:end].decode()
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"ModelSpec.{MODEL_SPEC.fields[number][0]} is not UTF-8"
            ) from None
        if number == 1:
            name = text or None
        else:
            label = text or None

    MODEL_SPEC.scan(data, on_field)
    if name is None and version is None and label is None:
        return None
    return Pin(name, version, label)


def _image_size_error(size: int, where: str = "image") -> InvalidArgument:
    return InvalidArgument(
        f"{where} has {size} bytes, expected {IMAGE_BYTES} (28x28 uint8, row-major)"
    )


def _once(seen: set[int], number: int, fields: Fields) -> None:
    # proto3 lets a later copy of a field replace an earlier one; a client never needs that,
    # and refusing it keeps a body of a million copies from costing a million steps
    if number in seen:
        name = fields.fields[number][0]
        raise InvalidArgument(f"{fields.message}.{name} (field {number}) appears more than once")
    seen.add(number)


def _image_at(data: bytes, start: int, end: int) -> np.ndarray:
    if end - start != IMAGE_BYTES:
        raise _image_size_error(end - start)
    return np.frombuffer(data, np.uint8, IMAGE_BYTES, start).reshape(1, *IMAGE_SHAPE)


def parse_predict(data: bytes) -> np.ndarray:
    """A PredictRequest's image as uint8 ``[1, 28, 28]``, read in place (no copy)."""
    return parse_predict_pinned(data)[0]


def parse_predict_pinned(data: bytes) -> tuple[np.ndarray, Pin | None]:
    """A PredictRequest's image (as :func:`parse_predict`) and its ModelSpec's pin."""
    if len(data) == _IMAGE_ENTRY and data.startswith(_IMAGE_HEADER):  # the common case
        return np.frombuffer(data, np.uint8, IMAGE_BYTES, 3).reshape(1, *IMAGE_SHAPE), None
    found: list[np.ndarray] = []
    pin: Pin | None = None
    seen: set[int] = set()

    def on_field(number: int, value: int, start: int, end: int) -> None:
        nonlocal pin
        _once(seen, number, PREDICT_REQUEST)
        if number == _MODEL_SPEC_FIELD:
            pin = parse_model_spec(data[start:end])
        else:
            found.append(_image_at(data, start, end))

    PREDICT_REQUEST.scan(data, on_field)
    if not found:
        raise _image_size_error(0)
    return found[0], pin


def parse_batch_predict(data: bytes, max_images: int) -> np.ndarray:
    """A BatchPredictRequest's images as uint8 ``[N, 28, 28]``; errors name the bad index."""
    return parse_batch_predict_pinned(data, max_images)[0]


def parse_batch_predict_pinned(data: bytes, max_images: int) -> tuple[np.ndarray, Pin | None]:
    """A BatchPredictRequest's images as uint8 ``[N, 28, 28]`` and its ModelSpec's pin;
    errors name the bad index.

    The images are a strided view of ``data`` (no copy). The count is checked before any image
    is looked at, and a malformed entry stops the reading where it is.
    """
    n, rest = divmod(len(data), _IMAGE_ENTRY)
    first_bad = 0
    if n:
        rows = np.frombuffer(data, np.uint8, n * _IMAGE_ENTRY).reshape(n, _IMAGE_ENTRY)
        good = (rows[:, : len(_IMAGE_HEADER)] == _IMAGE_HEADER_ARRAY).all(axis=1)
        first_bad = int(good.argmin()) if not good.all() else n
        if first_bad == n and not rest:  # the common case: every entry a 784-byte image
            check_count(n, max_images)
            return rows[:, len(_IMAGE_HEADER) :].reshape(n, *IMAGE_SHAPE), None
    # Something is off from entry `first_bad` on (or the body is empty): read on from there
    # one field at a time, to name the first problem exactly.
    count = first_bad
    check_count(count, max_images)
    starts = [i * _IMAGE_ENTRY + len(_IMAGE_HEADER) for i in range(first_bad)]
    pin: Pin | None = None
    pinned = False

    def on_field(number: int, value: int, start: int, end: int) -> None:
        nonlocal count, pin, pinned
        if number == _MODEL_SPEC_FIELD:  # the pin (after the images, as protobuf writes it)
            if pinned:
                raise InvalidArgument(
                    "BatchPredictRequest.model_spec (field 2) appears more than once"
                )
            pin, pinned = parse_model_spec(data[start:end]), True
            return
        if count >= max_images:
            raise InvalidArgument(
                f"more than {max_images} images in one request, limit {max_images}; "
                "split into several requests"
            )
        if end - start != IMAGE_BYTES:
            raise _image_size_error(end - start, f"images[{count}]")
        starts.append(start)
        count += 1

    BATCH_PREDICT_REQUEST.scan(data, on_field, first_bad * _IMAGE_ENTRY)
    if not starts:
        raise InvalidArgument("BatchPredict needs at least one image")
    if (
        pinned
        and count == len(starts)
        and starts == [i * _IMAGE_ENTRY + len(_IMAGE_HEADER) for i in range(count)]
    ):  # the images then the pin, as a client writes them: still a view of ``data``
        rows = np.frombuffer(data, np.uint8, count * _IMAGE_ENTRY).reshape(count, _IMAGE_ENTRY)
        return rows[:, len(_IMAGE_HEADER) :].reshape(count, *IMAGE_SHAPE), pin
    # only reached for valid but unusual encodings (e.g. over-long varint lengths)
    pixels = b"".join(data[s : s + IMAGE_BYTES] for s in starts)
    return np.frombuffer(pixels, np.uint8).reshape(len(starts), *IMAGE_SHAPE), pin


def check_count(n: int, max_images: int) -> None:
    """More than ``max_images`` images in one request is INVALID_ARGUMENT."""
    if n > max_images:
        raise InvalidArgument(
            f"{n} images in one request, limit {max_images}; split into several requests"
        )


def parse_empty(data: bytes) -> None:
    """Check a message that has no fields: any field is unknown."""
    Fields("Empty", {}).scan(data, lambda *_: None)


def parse_model_info(data: bytes) -> Pin | None:
    """A GetModelInfoRequest's pin (None: the default version)."""
    pin: Pin | None = None
    seen: set[int] = set()

    def on_field(number: int, value: int, start: int, end: int) -> None:
        nonlocal pin
        _once(seen, number, MODEL_INFO_REQUEST)
        pin = parse_model_spec(data[start:end])

    MODEL_INFO_REQUEST.scan(data, on_field)
    return pin


def parse_stream_request(data: bytes) -> tuple[int, np.ndarray]:
    """A PredictStreamRequest's ``id`` and image (``[1, 28, 28]``, read in place)."""
    request_id, image, _ = parse_stream_pinned(data)
    return request_id, image


def parse_stream_pinned(data: bytes) -> tuple[int, np.ndarray, Pin | None]:
    """A PredictStreamRequest's ``id``, image (``[1, 28, 28]``, read in place) and pin.

    A wrong-sized image raises INVALID_ARGUMENT as usual; the caller needs the id first to
    answer that image's own error, so it is available as ``StreamImageError.request_id``.
    """
    request_id = 0
    image_span: tuple[int, int] | None = None
    spec_span: tuple[int, int] | None = None
    seen: set[int] = set()

    def on_field(number: int, value: int, start: int, end: int) -> None:
        nonlocal request_id, image_span, spec_span
        _once(seen, number, STREAM_REQUEST)
        if number == 1:
            request_id = value
        elif number == 2:
            image_span = (start, end)
        else:
            spec_span = (start, end)

    STREAM_REQUEST.scan(data, on_field)
    start, end = image_span or (0, 0)
    try:
        pin = parse_model_spec(data[spec_span[0] : spec_span[1]]) if spec_span else None
        return request_id, _image_at(data, start, end), pin
    except InvalidArgument as err:
        raise StreamImageError(request_id, err.message) from None


class StreamImageError(InvalidArgument):
    """A stream message whose id was read but whose image is wrong: only that image fails."""

    def __init__(self, request_id: int, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


# --- responses


def _tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


_DIGIT_TAG = _tag(1, _VARINT)
_PROBS_HEADER = _tag(2, _LEN) + varint(NUM_CLASSES * 4)
_VERSION_TAG = _tag(3, _VARINT)


def encode_predict(probabilities: np.ndarray, version: int) -> bytes:
    """A PredictResponse for one row of probabilities ``[10]`` and its model version."""
    digit = int(probabilities.argmax())
    return b"".join((
        _DIGIT_TAG + bytes((digit,)) if digit else b"",
        _PROBS_HEADER,
        float32_le(probabilities),
        _VERSION_TAG + varint(version) if version else b"",
    ))  # fmt: skip


def packed_varints(values: np.ndarray) -> bytes:
    """Non-negative integers as a packed run of varints (one byte each when all are < 128)."""
    if len(values) and int(values.max()) < 0x80 and int(values.min()) >= 0:
        return values.astype(np.uint8).tobytes()
    if len(values) and bool((values == values[0]).all()):
        return varint(int(values[0])) * len(values)
    return b"".join(varint(int(v)) for v in values)


def _packed(number: int, payload: bytes) -> bytes:
    return _tag(number, _LEN) + varint(len(payload)) + payload if payload else b""


def encode_batch_predict(probabilities: np.ndarray, versions: np.ndarray) -> bytes:
    """A BatchPredictResponse: packed digits, row-major probabilities, per-image versions."""
    return b"".join((
        _packed(1, packed_varints(probabilities.argmax(axis=1))),
        _packed(2, float32_le(probabilities)),
        _packed(3, packed_varints(versions)),
    ))  # fmt: skip


_STREAM_ID_TAG = _tag(1, _VARINT)
_STREAM_PREDICTION_TAG = _tag(2, _LEN)
_STREAM_ERROR_TAG = _tag(3, _LEN)
_ERROR_CODE_TAG = _tag(1, _VARINT)
_ERROR_MESSAGE_TAG = _tag(2, _LEN)


_STREAM_TIMING_TAG = _tag(4, _LEN)
_TIMING_STRUCT = struct.Struct("<BdBdBd")  # three (tag, little-endian double) pairs
_TIMING_TAGS = (_tag(1, _I64)[0], _tag(2, _I64)[0], _tag(3, _I64)[0])
_BATCH_TAG = _tag(4, _VARINT)


def encode_timing(queue_s: float, compute_s: float, total_s: float, batch_size: int) -> bytes:
    """A ServerTiming message (milliseconds; every field written, zeros included)."""
    q, c, t = _TIMING_TAGS
    return _TIMING_STRUCT.pack(q, queue_s * 1e3, c, compute_s * 1e3, t, total_s * 1e3) + (
        _BATCH_TAG + varint(batch_size) if batch_size else b""
    )


def encode_stream_prediction(
    request_id: int,
    probabilities: np.ndarray,
    version: int,
    timing: tuple[float, float, float, int] | None = None,
) -> bytes:
    """A PredictStreamResponse carrying one image's prediction (and its server timing)."""
    prediction = encode_predict(probabilities, version)
    timed = encode_timing(*timing) if timing is not None else b""
    return b"".join((
        _STREAM_ID_TAG + varint(request_id) if request_id else b"",
        _STREAM_PREDICTION_TAG, varint(len(prediction)), prediction,
        _STREAM_TIMING_TAG + varint(len(timed)) + timed if timed else b"",
    ))  # fmt: skip


def encode_stream_error(request_id: int, code: int, message: str) -> bytes:
    """A PredictStreamResponse carrying one image's error (a gRPC status code and message)."""
    text = message.encode()
    error = b"".join((
        _ERROR_CODE_TAG + varint(code) if code else b"",
        _ERROR_MESSAGE_TAG + varint(len(text)) + text if text else b"",
    ))  # fmt: skip
    return b"".join((
        _STREAM_ID_TAG + varint(request_id) if request_id else b"",
        _STREAM_ERROR_TAG, varint(len(error)), error,
    ))  # fmt: skip
