"""The ``mnist.v1.DigitClassifier`` protocol: its messages to the inference core and back.

Each method only converts (bytes to a uint8 array with :mod:`server.wire`, the core's answer
back to bytes) and delegates to :class:`~server.core.InferenceCore`; admission, auth, status
mapping and metrics live in :mod:`server.rpc`. A request's optional ``model_spec`` (model
name, version, label) pins it; without one it goes to the default version. ListModels and
ConfigureModel are the core's repository calls (``index``, ``load``, ``unload``,
``configure``).
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
from server.batcher import Answer
from server.core import ModelStatus
from server.errors import InvalidArgument, ServiceError
from server.manager import KEEP, KeepType
from server.protocols.base import ProtocolContext, Service, parse
from server.rpc import Call
from server.streams import ItemError
from server.versions import LoadedModel, VersionPolicy

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitClassifier"].full_name


class DigitClassifier:
    """mnist.v1's methods, each a converter to the inference core."""

    label_prefix = ""  # mnist.v1's methods are the metrics' plain names: Predict, ...

    def __init__(self, context: ProtocolContext) -> None:
        self._core = context.core
        self._settings = context.settings

    def services(self) -> list[Service]:
        """``mnist.v1.DigitClassifier``: five unary methods and PredictStream."""
        unary = {
            "Predict": self.predict,
            "BatchPredict": self.batch_predict,
            "GetModelInfo": self.get_model_info,
            "ListModels": self.list_models,
            "ConfigureModel": self.configure_model,
        }
        return [Service(SERVICE_NAME, unary, {"PredictStream": self})]

    async def predict(self, raw: bytes, call: Call) -> bytes:
        call.images = 1  # a Predict carries one image, even one that turns out to be wrong
        images, pin = wire.parse_predict_pinned(raw)
        loaded = self._resolve(pin)
        answer = call.answer = await self._core.submit(images, loaded, call.deadline)
        return wire.encode_predict(answer.probabilities[0], int(answer.versions[0]))

    async def batch_predict(self, raw: bytes, call: Call) -> bytes:
        images, pin = wire.parse_batch_predict_pinned(raw, self._settings.max_images_per_request)
        call.images = len(images)
        loaded = self._resolve(pin)
        answer = call.answer = await self._core.submit(images, loaded, call.deadline)
        return wire.encode_batch_predict(answer.probabilities, answer.versions)

    def _resolve(self, pin: wire.Pin | None) -> LoadedModel:
        """The version a request's ``model_spec`` pins, or the default without one."""
        return self._core.resolve(*pin) if pin else self._core.resolve()

    # PredictStream: the codec that server.streams.StreamMethod reads and answers with

    def read(self, raw: bytes) -> tuple[int, np.ndarray, LoadedModel]:
        """A PredictStreamRequest's id, its image and the version for it (its own
        ``model_spec``, else the default, resolved as it is read); a wrong image (or no
        version to serve it) is that id's own error."""
        try:
            request_id, image, pin = wire.parse_stream_pinned(raw)
        except wire.StreamImageError as err:
            raise ItemError(err.request_id, err) from None
        try:
            return request_id, image, self._resolve(pin)
        except ServiceError as err:
            raise ItemError(request_id, err) from None

    def answer(self, key: Any, answer: Answer, total_s: float | None) -> bytes:
        """A PredictStreamResponse with the prediction (and its timing)."""
        timing = None
        if total_s is not None:
            timing = (answer.queue_s, answer.compute_s, total_s, answer.batch_size)
        return wire.encode_stream_prediction(
            key, answer.probabilities[0], int(answer.versions[0]), timing
        )

    def fail(self, key: Any, error: ServiceError) -> bytes:
        """A PredictStreamResponse with the error, for the request ``key``."""
        return wire.encode_stream_error(key, error.code.value[0], error.message)

    async def get_model_info(self, raw: bytes, call: Call) -> bytes:
        pin = wire.parse_model_info(raw)
        model = self._resolve(pin)
        manager = self._core.repository.model(model.name)
        routes = manager.routes
        s = self._settings
        failure = manager.last_failure
        return pb.GetModelInfoResponse(
            model_version=model.version,
            architecture=model.architecture,
            test_accuracy=model.test_accuracy,
            input=pb.TensorSpec(name=INPUT_NAME, dtype=INPUT_DTYPE, shape=INPUT_SHAPE),
            output=pb.TensorSpec(name=OUTPUT_NAME, dtype=OUTPUT_DTYPE, shape=OUTPUT_SHAPE),
            device=model.device,
            runtime=model.runtime_name,
            memory_bytes=model.memory_bytes,
            loaded_versions=sorted(routes.versions),
            labels={name: m.version for name, m in routes.labels.items()},
            versions=[
                pb.VersionStatus(version=v.version, state=v.state, reason=v.reason)
                for v in manager.version_states()
            ],
            model_name=model.name,
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

    # --- the repository's management calls

    async def list_models(self, raw: bytes, call: Call) -> bytes:
        parse(pb.ListModelsRequest, raw)
        statuses = [_model_status(status) for status in self._core.index()]
        return pb.ListModelsResponse(models=statuses).SerializeToString()

    async def configure_model(self, raw: bytes, call: Call) -> bytes:
        request = parse(pb.ConfigureModelRequest, raw)
        core = self._core
        policy = _policy(request)
        labels = dict(request.labels) if request.set_labels else None
        if request.labels and not request.set_labels:
            raise InvalidArgument("labels given without set_labels (which says they replace all)")
        if labels and not all(labels):
            raise InvalidArgument("a label name is empty")
        if request.load and request.unload:
            raise InvalidArgument("load and unload exclude each other")
        if request.unload and (request.HasField("version_policy") or request.set_labels):
            raise InvalidArgument("unload excludes version_policy and set_labels")
        # the named model, else the default one (NOT_FOUND when it is ambiguous)
        name = request.name or core.repository.model().model_name
        if request.unload:
            status = await core.unload(name)
        elif request.load:
            status = await core.load(name, None if isinstance(policy, KeepType) else policy)
            if labels is not None:
                status = await core.configure(name, KEEP, labels)
        else:
            status = await core.configure(name, policy, labels)
        return _model_status(status).SerializeToString()


def _policy(request: pb.ConfigureModelRequest) -> VersionPolicy | KeepType | None:
    """A ConfigureModelRequest's version policy: KEEP when unset, None for "" (back to
    ``--version-policy``); INVALID_ARGUMENT when it does not parse."""
    if not request.HasField("version_policy"):
        return KEEP
    if not request.version_policy:
        return None
    try:
        return VersionPolicy.parse(request.version_policy)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def _model_status(status: ModelStatus) -> pb.ModelStatus:
    versions = [pb.VersionStatus(version=v.version, state=v.state, reason=v.reason)
                for v in status.versions]  # fmt: skip
    return pb.ModelStatus(
        name=status.name,
        version_policy=status.policy,
        versions=versions,
        labels=dict(status.labels),
        default_version=status.default_version or 0,
    )
