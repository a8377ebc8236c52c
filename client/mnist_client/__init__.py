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
    Prediction,
    PredictionError,
    StreamResult,
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
    "Prediction",
    "PredictionError",
    "StreamResult",
    "Timing",
    "to_batch",
    "to_image_bytes",
]
__version__ = "0.1.0"
