"""Hostile input: arbitrary messages and bytes (hypothesis), and malformed HTTP/2 on the port."""

from __future__ import annotations

import socket
import struct
from collections import Counter

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_client import DigitClient
from mnist_client.pb import digit_classifier_pb2 as pb
from server import wire
from tests.conftest import ServerProcess

METHODS = ("Predict", "BatchPredict", "GetModelInfo")
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CASES: Counter[str] = Counter()
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(f"/mnist.v1.DigitClassifier/{method}")
    try:
        call(payload, timeout=10)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def channel(server: ServerProcess):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _assert_still_serving(server: ServerProcess) -> None:
    with DigitClient(server.target) as client:
        assert client.predict(np.zeros((28, 28), np.uint8)).model_version == 1
        assert client.health() == "SERVING"


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=4096))
def test_arbitrary_bytes_get_a_proper_status(
    channel: grpc.Channel, method: str, payload: bytes
) -> None:
    code, details = _call(channel, method, payload)
    CASES["raw bytes"] += 1
    assert code in ALLOWED, (code, details)
    if code != grpc.StatusCode.OK:
        assert details and "Exception" not in details and "Traceback" not in details


image_bytes = st.one_of(
    st.binary(min_size=784, max_size=784),
    st.binary(max_size=1600),
    st.sampled_from([b"", bytes(783), bytes(785), b"\xff" * 784]),
)


@FUZZ
@given(image=image_bytes)
def test_arbitrary_predict_requests(channel: grpc.Channel, image: bytes) -> None:
    code, details = _call(channel, "Predict", pb.PredictRequest(image=image).SerializeToString())
    CASES["Predict messages"] += 1
    if len(image) == 784:
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"image has {len(image)} bytes, expected 784" in details


@FUZZ
@given(images=st.lists(image_bytes, max_size=40))
def test_arbitrary_batch_requests(channel: grpc.Channel, images: list[bytes]) -> None:
    payload = pb.BatchPredictRequest(images=images).SerializeToString()
    code, details = _call(channel, "BatchPredict", payload)
    CASES["BatchPredict messages"] += 1
    bad = [i for i, im in enumerate(images) if len(im) != 784]
    if images and not bad:
        assert code == grpc.StatusCode.OK, details
    elif not images:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least one image" in details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"images[{bad[0]}] has {len(images[bad[0]])} bytes")


@FUZZ
@given(
    field_number=st.integers(min_value=1, max_value=2000),
    wire=st.sampled_from([0, 1, 2, 5]),
    method=st.sampled_from(METHODS),
)
def test_unknown_fields_are_skipped_and_mistyped_ones_invalid(
    channel: grpc.Channel, field_number: int, wire: int, method: str
) -> None:
    bodies = {0: b"\x01", 1: bytes(8), 2: b"\x03abc", 5: bytes(4)}
    key = field_number << 3 | wire
    varint = bytearray()
    while True:
        varint.append((key & 0x7F) | (0x80 if key > 0x7F else 0))
        key >>= 7
        if not key:
            break
    valid = {
        "Predict": pb.PredictRequest(image=bytes(784)).SerializeToString(),
        "BatchPredict": pb.BatchPredictRequest(images=[bytes(784)]).SerializeToString(),
        "GetModelInfo": b"",
    }[method]
    code, details = _call(channel, method, bytes(varint) + bodies[wire] + valid)
    CASES["unknown/mistyped fields"] += 1
    assert code in ALLOWED
    # field 2 of Predict/BatchPredict and field 1 of GetModelInfo: the optional ModelSpec
    known = {"Predict": {1: 2, 2: 2}, "BatchPredict": {1: 2, 2: 2}, "GetModelInfo": {1: 2}}[method]
    if known.get(field_number) == wire:
        return  # a real field with the right type: judged on its value
    if field_number in known:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field_number, wire, method)
        assert "wrong type" in details
    else:  # a field of a newer .proto: skipped, the request answered (proto3's rule)
        assert code == grpc.StatusCode.OK, (field_number, wire, method, details)


@FUZZ
@given(
    items=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2**64 - 1), image_bytes),
        max_size=12,
        unique_by=lambda item: item[0],
    ),
    tail=st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
)
def test_arbitrary_streams(
    channel: grpc.Channel, items: list[tuple[int, bytes]], tail: bytes | None
) -> None:
    """Every well-formed message is answered (a prediction, or an error for that id alone);
    raw bytes at the end either parse as a message or end the stream INVALID_ARGUMENT."""
    messages = [pb.PredictStreamRequest(id=i, image=im).SerializeToString() for i, im in items]
    if tail is not None:
        messages.append(tail)
    call = channel.stream_stream(
        "/mnist.v1.DigitClassifier/PredictStream",
        request_serializer=None,
        response_deserializer=pb.PredictStreamResponse.FromString,
    )
    answers = []
    try:
        for answer in call(iter(messages), timeout=10):
            answers.append(answer)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
    CASES["PredictStream calls"] += 1
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, code
    by_id = {}
    for answer in answers:
        by_id.setdefault(answer.id, []).append(answer)
    if tail is not None and code == grpc.StatusCode.OK:
        # the tail was read as a message (of unknown fields, skipped), or as one whose id
        # was read but not the rest (a malformed model_spec, which protobuf refuses whole):
        # answered under its id with an error (its image is never 784 bytes), which may come
        # before a batched prediction for the same id (stream answers keep no order)
        try:
            tail_id = pb.PredictStreamRequest.FromString(tail).id
        except DecodeError:
            with pytest.raises(wire.StreamImageError) as item_error:
                wire.parse_stream_pinned(tail)
            tail_id = item_error.value.request_id
        kinds = [answer.WhichOneof("result") for answer in by_id.get(tail_id, [])]
        assert "error" in kinds, (tail_id, kinds)
        by_id[tail_id].pop(kinds.index("error"))
    for request_id, image in items:  # answered before any malformed tail ended the call
        got = by_id.get(request_id, [])
        assert got, (request_id, code)
        assert len(got) == 1, (request_id, len(got))
        want = "prediction" if len(image) == 784 else "error"
        assert got[0].WhichOneof("result") == want, (request_id, len(image))


FUZZ_TESTS = (
    "raw bytes",
    "Predict messages",
    "BatchPredict messages",
    "unknown/mistyped fields",
    "PredictStream calls",
)


def test_fuzzing_ran_and_left_the_server_serving(server: ServerProcess) -> None:
    _assert_still_serving(server)
    print(f"\nfuzz cases run: {dict(CASES)} (total {sum(CASES.values())})")
    if not CASES:  # selected alone (-k): there is nothing to check, and it says so
        pytest.skip("run with the fuzz tests above; none of them ran")
    for name in FUZZ_TESTS:  # run with the fuzz tests above: each really tried its cases
        assert CASES[name] >= 100, (name, dict(CASES))


# -- malformed HTTP/2 on the gRPC port ------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _send(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = b""
        try:
            while len(chunks) < 65536:
                got = sock.recv(65536)
                if not got:
                    break
                chunks += got
        except TimeoutError:
            pass
        return chunks


SETTINGS = _frame(4, 0, 0, b"")
MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 8,
    "http1": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "truncated preface": PREFACE[:10],
    "huge frame length": PREFACE + SETTINGS + _frame(0, 0, 1, b"abc", length=0xFFFFFF),
    "truncated headers": PREFACE + SETTINGS + _frame(1, 4, 1, b"\x00\x05:meth", length=40),
    "data on stream 0": PREFACE + SETTINGS + _frame(0, 1, 0, b"\x00\x00\x00\x00\x00"),
    "bad hpack": PREFACE + SETTINGS + _frame(1, 5, 1, b"\xff\xff\xff\xff\xff\xff"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_http2_does_not_hurt_the_server(server: ServerProcess, name: str) -> None:
    port = int(server.target.rsplit(":", 1)[1])
    _send(port, MALFORMED[name])
    _assert_still_serving(server)


def _h2_call(port: int, frame: bytes) -> tuple[dict[bytes, bytes], int | None]:
    """Send one gRPC call whose body is ``frame`` (and END_STREAM) with h2; return the
    response headers and trailers merged, and the RST_STREAM error code if the stream was
    reset instead."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [
        (":method", "POST"), (":scheme", "http"), (":path", "/mnist.v1.DigitClassifier/Predict"),
        (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])  # fmt: skip
    conn.send_data(1, frame, end_stream=True)
    headers: dict[bytes, bytes] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the server closed the connection without answering the call"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    return headers, event.error_code
                elif isinstance(event, h2.events.StreamEnded):
                    return headers, None
            sock.sendall(conn.data_to_send())


@pytest.mark.parametrize(
    ("declared", "status", "message"),
    [
        (0xFFFFFFFF, b"8", b"Received message larger than max (4294967295 vs. 8388608)"),
        (64 * 1024 * 1024, b"8", b"Received message larger than max (67108864 vs. 8388608)"),
        (10_000, b"3", b"the call carried no complete request message"),  # body ends early
        (5, b"3", b"image has 3 bytes, expected 784"),  # length shorter than the body
    ],
)
def test_grpc_message_with_a_false_length(
    server: ServerProcess, declared: int, status: bytes, message: bytes
) -> None:
    port = int(server.target.rsplit(":", 1)[1])
    headers, reset = _h2_call(port, b"\x00" + struct.pack(">I", declared) + b"\x0a\x03abc")
    assert reset is None, f"stream reset with code {reset} instead of a gRPC status"
    assert headers[b"grpc-status"] == status, headers
    assert message in headers[b"grpc-message"], headers
    _assert_still_serving(server)
