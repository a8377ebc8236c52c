"""The other inference protocols this server speaks, on the same port as mnist.v1.

* :mod:`server.protocols.kserve`: KServe v2 / Open Inference Protocol
  (``inference.GRPCInferenceService``, what tritonclient speaks), with Triton's stream,
  model-configuration and statistics extensions.
* :mod:`server.protocols.tfserving`: TensorFlow Serving's ``PredictionService`` and
  ``ModelService``.

Each protocol is only a translation: its request becomes a uint8 image array for the batcher
every protocol shares (so calls of all protocols share model calls), and the batcher's answer
becomes its response. Admission, auth, deadlines, drain, status mapping and metrics are the
RPC layer's (:mod:`server.rpc`, :mod:`server.streams`), the same for every protocol.

Adding a protocol: its .proto files under ``proto/third_party`` (messages generated into the
private pool by ``scripts/gen_protos.py``); a module here with a class whose
``unary_methods()`` maps method names to ``async (raw bytes, Call) -> bytes`` functions (and,
for a stream, a :class:`~server.streams.StreamCodec`); one entry in ``server.app``'s list of
services.
"""
