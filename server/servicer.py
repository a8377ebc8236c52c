"""The ``mnist.v1.DigitClassifier`` methods: decode bytes with numpy, batch, encode.

Each method only converts the wire message to a uint8 array, hands it to the batcher, and
converts the answer back; status mapping, metrics and auth live in :mod:`server.rpc`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import grpc.aio
import numpy as np

from mnist_client.pb import digit_classifier_pb2 as pb
from server.batcher import DynamicBatcher
from server.errors import InvalidArgument, Unavailable
from server.manager import ModelManager
from server.model import INPUT_SHAPE
from server.settings import Settings

IMAGE_BYTES = INPUT_SHAPE[0] * INPUT_SHAPE[1]


def decode_image(data: bytes) -> np.ndarray:
    """One 784-byte image as a uint8 ``[1, 28, 28]`` array (no copy)."""
    if len(data) != IMAGE_BYTES:
        raise InvalidArgument(
            f"image has {len(data)} bytes, expected {IMAGE_BYTES} (28x28 uint8, row-major)"
        )
    return np.frombuffer(data, np.uint8).reshape(1, *INPUT_SHAPE)


def decode_images(images: Sequence[bytes], max_images: int) -> np.ndarray:
    """Many 784-byte images as one uint8 ``[N, 28, 28]`` array; errors name the bad index."""
    n = len(images)
    if n == 0:
        raise InvalidArgument("BatchPredict needs at least one image")
    if n > max_images:
        raise InvalidArgument(
            f"{n} images in one request, limit {max_images}; split into several requests"
        )
    if set(map(len, images)) != {IMAGE_BYTES}:  # per image: sizes could cancel out in the sum
        for i, image in enumerate(images):
            if len(image) != IMAGE_BYTES:
                raise InvalidArgument(
                    f"images[{i}] has {len(image)} bytes, expected {IMAGE_BYTES} "
                    "(28x28 uint8, row-major)"
                )
    return np.frombuffer(b"".join(images), np.uint8).reshape(n, *INPUT_SHAPE)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class DigitClassifierServicer:
    """Implements the three RPCs on top of the batcher and the model manager."""

    def __init__(self, batcher: DynamicBatcher, manager: ModelManager, settings: Settings):
        self._batcher = batcher
        self._manager = manager
        self._settings = settings

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        images = decode_image(request.image)
        probs, versions = await self._batcher.submit(images, _deadline(context))
        row = probs[0]
        return pb.PredictResponse(
            digit=int(row.argmax()), probabilities=row.tolist(), model_version=int(versions[0])
        )

    async def BatchPredict(
        self, request: pb.BatchPredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchPredictResponse:
        images = decode_images(request.images, self._settings.max_images_per_request)
        probs, versions = await self._batcher.submit(images, _deadline(context))
        return pb.BatchPredictResponse(
            digits=probs.argmax(axis=1).tolist(),
            probabilities=probs.ravel().tolist(),
            model_versions=versions.tolist(),
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        model = self._manager.current
        if model is None:
            raise Unavailable("no model version is loaded yet")
        s = self._settings
        failure = self._manager.last_failure
        return pb.GetModelInfoResponse(
            model_version=model.version,
            architecture=model.architecture,
            test_accuracy=model.test_accuracy,
            input=pb.TensorSpec(name="images", dtype="uint8", shape=[-1, *INPUT_SHAPE]),
            output=pb.TensorSpec(name="probabilities", dtype="float32", shape=[-1, 10]),
            device=model.device,
            runtime=model.runtime,
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
        )
