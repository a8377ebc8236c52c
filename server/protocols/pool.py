"""The descriptor pool of the foreign protocols' messages (KServe v2, TensorFlow Serving).

Their message names (``inference.ModelInferRequest``, ``tensorflow.TensorProto``) are those of
tritonclient's and TensorFlow's own generated modules. Those may be imported in the same
process as the server (the tests import them), and protobuf's default pool refuses a second
definition of a name; a pool of their own keeps both apart. The well-known types the protos
import are copied in first.
"""

from __future__ import annotations

from types import ModuleType

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()


def _add(module: ModuleType) -> None:
    try:
        POOL.FindFileByName(module.DESCRIPTOR.name)
    except KeyError:
        POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))


for _dependency in (any_pb2, wrappers_pb2):
    _add(_dependency)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """This pool with mnist.v1, health and reflection added: server reflection serves one
    pool, and it must describe every service on the port."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from mnist_client.pb import digit_classifier_pb2
    from server.protocols.pb import (
        open_inference_grpc_pb2,
        tensorflow_serving_pb2,
        triton_extensions_pb2,
    )

    for module in (digit_classifier_pb2, health_pb2, reflection_pb2, open_inference_grpc_pb2,
                   triton_extensions_pb2, tensorflow_serving_pb2):  # fmt: skip
        _add(module)
    return POOL
