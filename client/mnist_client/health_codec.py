"""The two tiny messages of ``grpc.health.v1.Health/Check``, encoded by hand.

The SDK promises to depend on grpcio, protobuf and numpy only; grpcio-health-checking would add
a package for two one-field messages. Wire format: HealthCheckRequest is field 1 (string
``service``), HealthCheckResponse is field 1 (enum ``status``).
"""

from __future__ import annotations

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_request(service: str) -> bytes:
    """Serialize ``HealthCheckRequest(service=service)``."""
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_response(data: bytes) -> str:
    """Parse ``HealthCheckResponse`` into its status name; an absent field means UNKNOWN (0)."""
    status, pos = 0, 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            if field == 1:
                status = value
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire} in HealthCheckResponse")
    return STATUS_NAMES.get(status, f"UNKNOWN({status})")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint in HealthCheckResponse")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
