"""Python SDK for the MNIST digit classifier gRPC service (``mnist.v1.DigitClassifier``).

from mnist_client import DigitClient
with DigitClient("localhost:8500") as client:
    print(client.predict("digit.png").digit)
"""

from mnist_client.client import (
    DEFAULT_TIMEOUT_S,
    AsyncDigitClient,
    BatchPrediction,
    DigitClient,
    ModelInfo,
    ModelStatus,
    Prediction,
    PredictionError,
    StreamResult,
    VersionStatus,
)
from mnist_client.images import IMAGE_BYTES, ImageError, to_batch, to_image_bytes
from mnist_client.timing import Timing

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "IMAGE_BYTES",
    "AsyncDigitClient",
    "BatchPrediction",
    "DigitClient",
    "ImageError",
    "ModelInfo",
    "ModelStatus",
    "Prediction",
    "PredictionError",
    "StreamResult",
    "Timing",
    "VersionStatus",
    "to_batch",
    "to_image_bytes",
]
__version__ = "0.1.0"
