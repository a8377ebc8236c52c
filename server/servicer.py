"""The ``mnist.v1.DigitClassifier`` methods: read the request, batch, write the answer.

Each method only converts (bytes to a uint8 array with :mod:`server.wire`, the batcher's
answer back to bytes) and delegates; admission, auth, status mapping and metrics live in
:mod:`server.rpc`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mnist_client.contract import (
    INPUT_DTYPE,
    INPUT_NAME,
    INPUT_SHAPE,
    OUTPUT_DTYPE,
    OUTPUT_NAME,
    OUTPUT_SHAPE,
)
from mnist_client.pb import digit_classifier_pb2 as pb
from server import wire
from server.batcher import Answer, DynamicBatcher
from server.errors import ServiceError
from server.manager import ModelManager
from server.rpc import Call, UnaryImpl
from server.settings import Settings
from server.streams import ItemError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitClassifier"].full_name


class DigitClassifier:
    """Implements the RPCs on top of the batcher and the model manager."""

    def __init__(self, batcher: DynamicBatcher, manager: ModelManager, settings: Settings):
        self._batcher = batcher
        self._manager = manager
        self._settings = settings

    def unary_methods(self) -> dict[str, UnaryImpl]:
        """The unary RPCs by name, for :func:`server.rpc.register`."""
        return {
            "Predict": self.predict,
            "BatchPredict": self.batch_predict,
            "GetModelInfo": self.get_model_info,
        }

    async def predict(self, raw: bytes, call: Call) -> bytes:
        call.images = 1  # a Predict carries one image, even one that turns out to be wrong
        images = wire.parse_predict(raw)
        self._manager.serving_model()
        answer = call.answer = await self._batcher.submit(images, call.deadline)
        return wire.encode_predict(answer.probabilities[0], int(answer.versions[0]))

    async def batch_predict(self, raw: bytes, call: Call) -> bytes:
        images = wire.parse_batch_predict(raw, self._settings.max_images_per_request)
        call.images = len(images)
        self._manager.serving_model()
        answer = call.answer = await self._batcher.submit(images, call.deadline)
        return wire.encode_batch_predict(answer.probabilities, answer.versions)

    # PredictStream: the codec that server.streams.StreamMethod reads and answers with

    def read(self, raw: bytes) -> tuple[int, np.ndarray]:
        """A PredictStreamRequest's id and image; a wrong image is that id's own error."""
        try:
            return wire.parse_stream_request(raw)
        except wire.StreamImageError as err:
            raise ItemError(err.request_id, err) from None

    def answer(self, key: Any, answer: Answer, total_s: float | None) -> bytes:
        timing = None
        if total_s is not None:
            timing = (answer.queue_s, answer.compute_s, total_s, answer.batch_size)
        return wire.encode_stream_prediction(
            key, answer.probabilities[0], int(answer.versions[0]), timing
        )

    def fail(self, key: Any, error: ServiceError) -> bytes:
        return wire.encode_stream_error(key, error.code.value[0], error.message)

    async def get_model_info(self, raw: bytes, call: Call) -> bytes:
        wire.parse_empty(raw)
        model = self._manager.serving_model()
        s = self._settings
        failure = self._manager.last_failure
        return pb.GetModelInfoResponse(
            model_version=model.version,
            architecture=model.architecture,
            test_accuracy=model.test_accuracy,
            input=pb.TensorSpec(name=INPUT_NAME, dtype=INPUT_DTYPE, shape=INPUT_SHAPE),
            output=pb.TensorSpec(name=OUTPUT_NAME, dtype=OUTPUT_DTYPE, shape=OUTPUT_SHAPE),
            device=model.device,
            runtime=model.runtime_name,
            batching=pb.BatchingConfig(
                max_batch_size=s.max_batch_size,
                batch_timeout_ms=s.batch_timeout_ms,
                max_queue_images=s.max_queue_images,
                max_images_per_request=s.max_images_per_request,
            ),
            metadata_json=json.dumps(model.metadata, sort_keys=True),
            loaded_at=model.loaded_at,
            last_failed_version=failure.version if failure else 0,
            last_failure=failure.reason if failure else "",
        ).SerializeToString()
