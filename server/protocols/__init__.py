"""The other inference protocols this server speaks, on the same port as mnist.v1.

* :mod:`server.protocols.kserve`: KServe v2 / Open Inference Protocol
  (``inference.GRPCInferenceService``, what tritonclient speaks), with Triton's stream,
  model-configuration and statistics extensions.
* :mod:`server.protocols.tfserving`: TensorFlow Serving's ``PredictionService`` and
  ``ModelService``.

Each protocol is only a converter: its request becomes a core call
(:class:`~server.core.InferenceCore`: model lookup and pinning, then the batcher every
protocol shares, so calls of all protocols share model calls), and the core's answer becomes
its response. Admission, auth, deadlines, drain, status mapping and metrics are the RPC
layer's (:mod:`server.rpc`, :mod:`server.streams`), the same for every protocol.

Adding a protocol: its .proto files under ``proto/third_party`` (messages generated into the
private pool by ``scripts/gen_protos.py``); a module here with a class built from a
:class:`~server.protocols.base.ProtocolContext` that declares its services
(:class:`~server.protocols.base.ServingProtocol`: each service's unary methods,
``async (raw bytes, Call) -> bytes``, and stream codecs, :class:`~server.streams.StreamCodec`,
and its metrics label prefix); one entry in ``server.app.PROTOCOLS``.
"""
