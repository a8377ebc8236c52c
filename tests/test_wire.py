"""The mnist.v1 wire codec against protobuf itself: same values read, same bytes written; and
hostile bodies refused after their first problem, however large they are."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mnist_client.pb import digit_classifier_pb2 as pb
from server import wire
from server.errors import InvalidArgument

EIGHT_MIB = 8 * 1024 * 1024
IMAGE = st.binary(min_size=784, max_size=784)
PROBS = hnp.arrays(np.float32, 10, elements=st.floats(0, 1, width=32))
VERSIONS = st.integers(min_value=1, max_value=2**62)


@settings(max_examples=200, deadline=None)
@given(image=st.one_of(IMAGE, st.binary(max_size=1600)))
def test_predict_requests_read_like_protobuf(image: bytes) -> None:
    raw = pb.PredictRequest(image=image).SerializeToString()
    if len(image) == 784:
        assert wire.parse_predict(raw).tobytes() == image
    else:
        with pytest.raises(InvalidArgument, match=f"image has {len(image)} bytes, expected 784"):
            wire.parse_predict(raw)


@settings(max_examples=200, deadline=None)
@given(images=st.lists(st.one_of(IMAGE, IMAGE, st.binary(max_size=900)), min_size=1, max_size=30))
def test_batch_requests_read_like_protobuf(images: list[bytes]) -> None:
    raw = pb.BatchPredictRequest(images=images).SerializeToString()
    bad = [i for i, im in enumerate(images) if len(im) != 784]
    if bad:
        with pytest.raises(InvalidArgument, match=rf"^images\[{bad[0]}\] has "):
            wire.parse_batch_predict(raw, 4096)
    else:
        got = wire.parse_batch_predict(raw, 4096)
        assert got.shape == (len(images), 28, 28)
        assert [row.tobytes() for row in got] == images


def test_batch_request_limits_and_unusual_encodings() -> None:
    images = [bytes([i]) * 784 for i in range(5)]
    raw = pb.BatchPredictRequest(images=images).SerializeToString()
    with pytest.raises(InvalidArgument, match="5 images in one request, limit 4"):
        wire.parse_batch_predict(raw, 4)
    with pytest.raises(InvalidArgument, match="at least one image"):
        wire.parse_batch_predict(b"", 4)
    # a valid, if unusual, length encoding (varint 784 in three bytes) is still read
    padded = b"".join(b"\x0a\x90\x86\x00" + im for im in images)
    assert [r.tobytes() for r in wire.parse_batch_predict(padded, 8)] == images
    # more than the limit of otherwise valid entries after an unusual one: stops at the limit
    with pytest.raises(InvalidArgument, match="more than 4 images"):
        wire.parse_batch_predict(raw[:787] + padded, 4)


@settings(max_examples=200, deadline=None)
@given(probs=PROBS, version=VERSIONS)
def test_predict_responses_are_protobufs_bytes(probs: np.ndarray, version: int) -> None:
    expected = pb.PredictResponse(
        digit=int(probs.argmax()), probabilities=probs.tolist(), model_version=version
    ).SerializeToString()
    assert wire.encode_predict(probs, version) == expected


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
def test_batch_responses_are_protobufs_bytes(n: int, data: st.DataObject) -> None:
    probs = data.draw(hnp.arrays(np.float32, (n, 10), elements=st.floats(0, 1, width=32)))
    versions = np.array(
        data.draw(st.lists(st.sampled_from([1, 7, 300, 2**40]), min_size=n, max_size=n)),
        np.int64,
    )
    expected = pb.BatchPredictResponse(
        digits=probs.argmax(axis=1).tolist(),
        probabilities=probs.ravel().tolist(),
        model_versions=versions.tolist(),
    ).SerializeToString()
    assert wire.encode_batch_predict(probs, versions) == expected


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (b"\x08\x05", "image (field 1) has the wrong type (varint)"),
        (b"\x7b\x7c", "field 15 in PredictRequest has wire type group, which proto3 has not"),
        (b"\x7a\x05ab", "not a valid mnist.v1.PredictRequest"),  # unknown, cut short
        (b"\x0a\xff\xff", "not a valid mnist.v1.PredictRequest"),
        (b"\x0a\x05ab", "not a valid mnist.v1.PredictRequest"),
        (b"\xff" * 11, "not a valid mnist.v1.PredictRequest"),  # a varint that never ends
        (b"\x00" * 8, "not a valid mnist.v1.PredictRequest"),  # field number 0 (fuzz found)
        (b"\x80\x80\x80\x80\x10\x00", "not a valid mnist.v1.PredictRequest"),  # number 2**29
    ],
)
def test_malformed_predict_requests(message: bytes, fields: str) -> None:
    with pytest.raises(InvalidArgument, match=fields.replace("(", r"\(").replace(")", r"\)")):
        wire.parse_predict(message)


@pytest.mark.parametrize(
    ("parse", "body", "message"),
    [
        # protobuf would build a million-entry UnknownFieldSet for each of these (fields 5
        # and 6: field 2 is PredictRequest.model_spec)
        (wire.parse_predict, b"\x28\x01" * (EIGHT_MIB // 2), "more than 64 unknown fields"),
        (wire.parse_predict, b"\x35\0\0\0\0" * (EIGHT_MIB // 5), "more than 64 unknown"),
        (lambda b: wire.parse_batch_predict(b, 4096), b"\x0a\x00" * (EIGHT_MIB // 2),
         "images[0] has 0 bytes"),
        (lambda b: wire.parse_batch_predict(b, 4096),
         (b"\x0a\x90\x06" + bytes(784)) * 10 + b"\x28\x01" * (EIGHT_MIB // 2),
         "more than 64 unknown fields in BatchPredictRequest"),
        (lambda b: wire.parse_batch_predict(b, 4096), (b"\x0a\x90\x06" + bytes(784)) * 10_000,
         "10000 images in one request, limit 4096"),
    ],
)  # fmt: skip
def test_hostile_bodies_are_refused_at_their_first_problem(
    parse, body: bytes, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    steps = 0
    read_varint = wire.read_varint

    def counting(data: bytes, pos: int, name: str) -> tuple[int, int]:
        nonlocal steps
        steps += 1
        return read_varint(data, pos, name)

    monkeypatch.setattr(wire, "read_varint", counting)
    with pytest.raises(InvalidArgument) as info:
        parse(body)
    assert message in info.value.message
    limit = 2 * wire.MAX_UNKNOWN_FIELDS + 4  # a key and a value per skipped field
    assert steps <= limit, f"{steps} fields read from an 8 MiB body before refusing it"


# one unknown field of each wire type, as a caller built from a newer .proto would send
NEWER_FIELDS = b"".join((
    b"\x78\x96\x01",  # field 15, varint 150
    b"\x81\x01" + bytes(8),  # field 16, 64-bit
    b"\x8a\x01\x03abc",  # field 17, length-delimited
    b"\x95\x01" + bytes(4),  # field 18, 32-bit
))  # fmt: skip


def test_unknown_fields_are_skipped_as_protobuf_skips_them() -> None:
    image = bytes(range(256)) * 3 + bytes(16)
    predict = NEWER_FIELDS + pb.PredictRequest(image=image).SerializeToString() + NEWER_FIELDS
    assert pb.PredictRequest.FromString(predict).image == image
    assert wire.parse_predict(predict).tobytes() == image
    batch = pb.BatchPredictRequest(images=[image, image]).SerializeToString()
    mixed = batch[:787] + NEWER_FIELDS + batch[787:]
    assert wire.parse_batch_predict(mixed, 10).tobytes() == image * 2
    stream = NEWER_FIELDS + pb.PredictStreamRequest(id=7, image=image).SerializeToString()
    request_id, got = wire.parse_stream_request(stream)
    assert (request_id, got.tobytes()) == (7, image)
    assert wire.parse_model_info(NEWER_FIELDS) is None  # GetModelInfoRequest: all unknown
    with pytest.raises(InvalidArgument, match="more than 64 unknown fields"):
        wire.parse_model_info(NEWER_FIELDS * 17)


@settings(max_examples=200, deadline=None)
@given(request_id=st.integers(0, 2**64 - 1), probs=PROBS, version=VERSIONS,
       code=st.integers(0, 16), message=st.text(max_size=80))  # fmt: skip
def test_stream_answers_are_protobufs_bytes(
    request_id: int, probs: np.ndarray, version: int, code: int, message: str
) -> None:
    prediction = pb.PredictResponse(
        digit=int(probs.argmax()), probabilities=probs.tolist(), model_version=version
    )
    ok = pb.PredictStreamResponse(id=request_id, prediction=prediction).SerializeToString()
    assert wire.encode_stream_prediction(request_id, probs, version) == ok
    error = pb.PredictStreamResponse(
        id=request_id, error=pb.ImageError(code=code, message=message)
    ).SerializeToString()
    assert wire.encode_stream_error(request_id, code, message) == error


@settings(max_examples=200, deadline=None)
@given(request_id=st.integers(0, 2**64 - 1), image=st.one_of(IMAGE, st.binary(max_size=900)))
def test_stream_requests_read_like_protobuf(request_id: int, image: bytes) -> None:
    raw = pb.PredictStreamRequest(id=request_id, image=image).SerializeToString()
    if len(image) == 784:
        got_id, got = wire.parse_stream_request(raw)
        assert (got_id, got.tobytes()) == (request_id, image)
    else:
        with pytest.raises(wire.StreamImageError) as info:
            wire.parse_stream_request(raw)
        assert info.value.request_id == request_id  # the error names the image it is about


@pytest.mark.parametrize("last", [0x01, 0x7F])
def test_a_varint_past_64_bits_reads_as_protobuf_reads_it(last: int) -> None:
    raw = (
        b"\x08"
        + b"\xff" * 9
        + bytes([last])
        + pb.PredictStreamRequest(image=bytes(784)).SerializeToString()
    )
    request_id, _ = wire.parse_stream_request(raw)
    assert request_id == pb.PredictStreamRequest.FromString(raw).id == 2**64 - 1
