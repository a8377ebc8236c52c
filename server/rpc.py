"""gRPC plumbing around the servicer: strict parsing, auth, status mapping and metrics.

Methods are registered with raw-bytes deserialization so that a malformed message, an unknown
field or a field of the wrong type is an INVALID_ARGUMENT the caller can act on (gRPC's own
deserializer would answer INTERNAL, and protobuf keeps unknown fields silently).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from mnist_client.pb import digit_classifier_pb2 as pb
from server.errors import InvalidArgument, ServiceError, Unauthenticated
from server.metrics import ServerMetrics
from server.servicer import DigitClassifierServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitClassifier"].full_name
_WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 5: "32-bit"}


def parse_request(message_type: type[Message], raw: bytes) -> Any:
    """Parse ``raw`` strictly: malformed bytes, unknown fields and wrong types are rejected."""
    name = message_type.DESCRIPTOR.name
    try:
        message = message_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"request is not a valid mnist.v1.{name} message") from None
    unknown = UnknownFieldSet(message)
    if len(unknown):
        field = unknown[0]
        known = message_type.DESCRIPTOR.fields_by_number.get(field.field_number)
        wire = _WIRE_TYPES.get(field.wire_type, str(field.wire_type))
        if known is not None:
            raise InvalidArgument(
                f"{name}.{known.name} (field {field.field_number}) has the wrong type ({wire})"
            )
        raise InvalidArgument(
            f"unknown field number {field.field_number} in {name}; this server speaks mnist.v1"
        )
    return message


class _Method:
    def __init__(
        self,
        name: str,
        request_type: type[Message],
        impl: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]],
        count_images: Callable[[Any], int],
        metrics: ServerMetrics,
        auth_token: bytes | None,
    ) -> None:
        self.name = name
        self.request_type = request_type
        self.impl = impl
        self.count_images = count_images
        self.metrics = metrics
        self.auth_token = auth_token
        self.active = 0  # RPCs of this method being handled; the gauge reads it at scrape time
        metrics.inflight.labels(name).set_function(lambda: self.active)

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        assert self.auth_token is not None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(presented, self.auth_token):
                    return
                raise Unauthenticated("invalid bearer token")
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")

    async def handle(self, raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        started = time.perf_counter()
        code = "OK"
        images = 0
        self.active += 1
        try:
            if self.auth_token is not None:
                self._authenticate(context)
            request = parse_request(self.request_type, raw)
            images = self.count_images(request)
            return await self.impl(request, context)
        except ServiceError as err:
            code = err.code.name
            await context.abort(err.code, err.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("unexpected error in %s", self.name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.active -= 1
            self.metrics.observe_rpc(self.name, code, images, time.perf_counter() - started)
        raise AssertionError("unreachable: context.abort raises")


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def add_digit_classifier(
    server: grpc.aio.Server,
    servicer: DigitClassifierServicer,
    metrics: ServerMetrics,
    auth_token: bytes | None,
) -> None:
    """Add the ``mnist.v1.DigitClassifier`` service to ``server`` (before it starts).

    The methods are registered with the C core, as generated code does: a registered method
    is matched there, not by a Python lookup over every generic handler on each call
    (one interleaved A/B at 64 concurrent calls: +10% Predict calls/s).
    """
    methods = [
        _Method("Predict", pb.PredictRequest, servicer.Predict, lambda r: 1, metrics, auth_token),
        _Method(
            "BatchPredict",
            pb.BatchPredictRequest,
            servicer.BatchPredict,
            lambda r: len(r.images),
            metrics,
            auth_token,
        ),
        _Method(
            "GetModelInfo",
            pb.GetModelInfoRequest,
            servicer.GetModelInfo,
            lambda r: 0,
            metrics,
            auth_token,
        ),
    ]
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(m.handle, response_serializer=_serialize)
        for m in methods
    }
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
