"""TensorFlow Serving's API: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Predict and GetModelMetadata on the signature ``serving_default`` (input ``images`` uint8
``[-1, 28, 28]``, output ``probabilities`` float ``[-1, 10]``), GetModelStatus and
HandleReloadConfigRequest; Classify, Regress and MultiInference answer UNIMPLEMENTED (this
model only predicts).

As TensorFlow Serving does:

* ``model_spec.name`` must be the served model's (``--model-name``), else NOT_FOUND;
  ``model_spec.version``, when set, pins a loaded version, else NOT_FOUND ("Servable not
  found", then what is loaded); ``version_label`` pins the version a label of
  ``MODEL_DIR/labels.json`` points at, else INVALID_ARGUMENT ("Unrecognized servable version
  label", then what is loaded); neither: the default version. The signature must be
  ``serving_default`` (or empty), else FAILED_PRECONDITION. GetModelMetadata needs
  ``metadata_field`` ``signature_def``.
* GetModelStatus with a version or label: that version, AVAILABLE (else as Predict refuses
  it). Without: every version of the model on disk or loaded, with its state: AVAILABLE
  (loaded), UNLOADING (finishing its calls), END (not loaded: status error_code 14,
  UNAVAILABLE, and why in error_message); a model with no version at all is NOT_FOUND
  ("Could not find any versions of model ...").
* HandleReloadConfigRequest (needs ``--model-control``, else FAILED_PRECONDITION): the
  ``model_config_list`` is the whole new configuration. Each model listed gets its
  ``model_version_policy`` (none set: ``--version-policy``; ``latest`` with 0 versions is 1,
  as in TF Serving) and then its ``version_labels``, the whole set (none: no labels), each
  pointing at a version loaded under the new policy, else FAILED_PRECONDITION; the models of
  the repository that are not listed are unloaded. Everything is checked before anything
  changes: a model that is not in the repository is NOT_FOUND, a model listed twice, a
  ``base_path`` other than "" or the model's own folder, an empty ``specific`` policy or an
  empty label name INVALID_ARGUMENT; ``model_platform`` is not read. The models are then
  changed one by one (as TF Serving, not as one transaction: a label refused for one model
  leaves the models before it changed). No config at all changes nothing; a
  ``custom_model_config`` is FAILED_PRECONDITION, as in TF Serving. The changes go into each
  model folder's ``policy.json`` and ``labels.json`` (every replica on the folder follows).
* The input tensor comes as ``tensor_content`` (what ``tf.make_tensor_proto`` writes for an
  array) or as typed ``int_val`` values, where fewer values than elements repeat the last one
  (TensorFlow's compact form). A wrong input key, dtype or shape is INVALID_ARGUMENT.
* The answer's tensor is ``tensor_content``, little-endian float32.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mnist_client.contract import (
    IMAGE_BYTES,
    IMAGE_SHAPE,
    INPUT_NAME,
    INPUT_SHAPE,
    NUM_CLASSES,
    OUTPUT_NAME,
    OUTPUT_SHAPE,
    SIGNATURE,
)
from server.core import ModelStatus, UnknownLabel
from server.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented, bounded
from server.protocols.base import ProtocolContext, Service, image_count, parse
from server.protocols.pb import tensorflow_core_pb2 as tf
from server.protocols.pb import tensorflow_serving_pb2 as tfs
from server.rpc import Call
from server.versions import LoadedModel, VersionPolicy
from server.wire import float32_le

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
PREDICT_METHOD = "tensorflow/serving/predict"
_DTYPE_NAMES = {v.number: v.name for v in tf.DataType.DESCRIPTOR.values}
UNAVAILABLE_CODE = 14  # tensorflow.error.Code UNAVAILABLE: an END version's status
# GetModelStatus: the core's version states as TF Serving's
_STATES = {
    "READY": tfs.ModelVersionStatus.AVAILABLE,
    "UNLOADING": tfs.ModelVersionStatus.UNLOADING,
    "UNAVAILABLE": tfs.ModelVersionStatus.END,
}


class TFServing:
    """The TensorFlow Serving methods, each a converter to the inference core."""

    label_prefix = "tfserving."

    def __init__(self, context: ProtocolContext) -> None:
        self._core = context.core
        self._settings = context.settings

    def services(self) -> list[Service]:
        """``PredictionService`` and ``ModelService``."""
        prediction = {
            "Predict": self.predict,
            "GetModelMetadata": self.get_model_metadata,
            "Classify": self._unimplemented,
            "Regress": self._unimplemented,
            "MultiInference": self._unimplemented,
        }
        return [
            Service(PREDICTION_SERVICE, prediction),
            Service(
                MODEL_SERVICE,
                {
                    "GetModelStatus": self.get_model_status,
                    "HandleReloadConfigRequest": self.handle_reload_config_request,
                },
            ),
        ]

    def _served(self, spec: tfs.ModelSpec) -> LoadedModel:
        """The core's version for a model spec, refused in TF Serving's words."""
        version = spec.version.value if spec.HasField("version") else None  # 0 is a version
        try:
            model = self._core.resolve(spec.name, version, spec.version_label or None)
        except UnknownLabel:
            raise InvalidArgument(
                f"Unrecognized servable version label: {bounded(spec.version_label, 64)}; "
                f"{self._core.repository.model(spec.name).routes.loaded()}"
            ) from None
        except NotFound:
            name = bounded(spec.name, 64)
            request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            served = self._core.repository.models.get(spec.name or self._core.model_name)
            loaded = "" if served is None else f"; {served.routes.loaded()}"
            raise NotFound(f"Servable not found for request: {request}{loaded}") from None
        if spec.signature_name not in ("", SIGNATURE):  # TF Serving's status and words
            raise FailedPrecondition(
                f'Serving signature key "{bounded(spec.signature_name, 64)}" not found.'
            )
        return model

    def _spec(self, model: LoadedModel, version: int) -> tfs.ModelSpec:
        spec = tfs.ModelSpec(name=model.name, signature_name=SIGNATURE)
        spec.version.value = version
        return spec

    async def predict(self, raw: bytes, call: Call) -> bytes:
        request = parse(tfs.PredictRequest, raw)
        model = self._served(request.model_spec)
        for name in request.output_filter:
            if name != OUTPUT_NAME:
                raise InvalidArgument(
                    f"output tensor alias not found in signature: {bounded(name, 64)}. Outputs "
                    f"expected to "
                    f"be in the set {{{OUTPUT_NAME}}}."
                )
        images = _images(request, self._settings.max_images_per_request, call.charge)
        call.images = len(images)
        answer = call.answer = await self._core.submit(images, model, call.deadline)
        probs, versions = answer.probabilities, answer.versions
        response = tfs.PredictResponse(model_spec=self._spec(model, int(versions[-1])))
        out = response.outputs[OUTPUT_NAME]
        out.dtype = tf.DT_FLOAT
        out.tensor_shape.dim.add(size=len(probs))
        out.tensor_shape.dim.add(size=NUM_CLASSES)
        out.tensor_content = float32_le(probs)
        return response.SerializeToString()

    async def get_model_metadata(self, raw: bytes, call: Call) -> bytes:
        request = parse(tfs.GetModelMetadataRequest, raw)
        model = self._served(request.model_spec)
        if not request.metadata_field:
            raise InvalidArgument(
                "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise InvalidArgument(f"Metadata field {bounded(field, 64)} is not supported")
        signature = tf.SignatureDef(method_name=PREDICT_METHOD)
        signature.inputs[INPUT_NAME].CopyFrom(
            _info(f"{SIGNATURE}_{INPUT_NAME}:0", tf.DT_UINT8, list(INPUT_SHAPE))
        )
        signature.outputs[OUTPUT_NAME].CopyFrom(
            _info("StatefulPartitionedCall:0", tf.DT_FLOAT, list(OUTPUT_SHAPE))
        )
        signatures = tfs.SignatureDefMap()
        signatures.signature_def[SIGNATURE].CopyFrom(signature)
        response = tfs.GetModelMetadataResponse(model_spec=self._spec(model, model.version))
        response.metadata["signature_def"].Pack(signatures)
        return response.SerializeToString()

    async def get_model_status(self, raw: bytes, call: Call) -> bytes:
        request = parse(tfs.GetModelStatusRequest, raw)
        spec = request.model_spec
        if spec.HasField("version") or spec.version_label:  # that version, if it serves
            statuses = [_version_status(self._served(spec).version, "READY", "")]
        else:  # as TF Serving: every version, whatever its state
            statuses = [_version_status(v.version, v.state, v.reason)
                        for v in self._model_status(spec.name).versions]  # fmt: skip
        return tfs.GetModelStatusResponse(model_version_status=statuses).SerializeToString()

    def _model_status(self, name: str) -> ModelStatus:
        """The core's status of a model with at least one version, else NOT_FOUND in TF
        Serving's words."""
        try:
            status = self._core.status(name)
        except NotFound:
            raise NotFound(
                f"Could not find any versions of model {bounded(name, 64)}; this server "
                f"serves {self._core.repository.names()}"
            ) from None
        if not status.versions:
            raise NotFound(f"Could not find any versions of model {status.name}")
        return status

    async def handle_reload_config_request(self, raw: bytes, call: Call) -> bytes:
        request = parse(tfs.ReloadConfigRequest, raw)
        core = self._core
        core.check_control()
        which = request.config.WhichOneof("config")
        if which is None:  # TF Serving: "Taking no action for empty config."
            return tfs.ReloadConfigResponse(status=tfs.StatusProto()).SerializeToString()
        if which != "model_config_list":
            raise FailedPrecondition(
                "Cannot transition to requested config. It is only legal to transition from "
                "one ModelConfigList to another."
            )
        configs = list(request.config.model_config_list.config)
        if any(c.name not in core.repository.models for c in configs):  # a new folder?
            await asyncio.get_running_loop().run_in_executor(None, core.repository.scan)
        plan = [self._planned(config, configs[:i]) for i, config in enumerate(configs)]
        for name, policy, labels in plan:
            await core.configure(name, policy, labels)
        listed = {name for name, _, _ in plan}
        for name in sorted(set(core.repository.models) - listed):
            if not core.repository.models[name].policy.loads_nothing:  # not unloaded yet
                await core.unload(name)
        return tfs.ReloadConfigResponse(status=tfs.StatusProto(error_code=0)).SerializeToString()

    def _planned(
        self, config: tfs.ModelConfig, before: list[tfs.ModelConfig]
    ) -> tuple[str, VersionPolicy | None, dict[str, int]]:
        """What one ModelConfig of a reload asks (model, policy, labels), checked before
        anything changes."""
        name = config.name
        if any(c.name == name for c in before):
            raise InvalidArgument(
                f"Illegal to list model {bounded(name, 64)} multiple times in config list"
            )
        manager = self._core.repository.models.get(name)
        if manager is None:
            raise NotFound(
                f"model {bounded(name or '(no name)', 64)} is not in the model repository; "
                f"it holds {self._core.repository.names()}"
            )
        if config.base_path and Path(config.base_path).resolve() != manager.model_dir.resolve():
            raise InvalidArgument(
                f"model {name}: base_path {bounded(config.base_path, 100)} is not its folder "
                f"{manager.model_dir} (leave it empty: this server serves its model folder)"
            )
        labels = dict(config.version_labels)
        if "" in labels:
            raise InvalidArgument(f"model {name}: a version label needs a name")
        policy = None
        if config.HasField("model_version_policy"):
            policy = _policy(name, config.model_version_policy)
        return name, policy, labels

    async def _unimplemented(self, raw: bytes, call: Call) -> bytes:
        raise Unimplemented(
            "this model only predicts: use Predict (Classify, Regress and MultiInference "
            "are not served)"
        )


def _version_status(version: int, state: str, reason: str) -> tfs.ModelVersionStatus:
    """A version's state in TF Serving's terms; a version that is not loaded is END with
    why in its status."""
    tf_state = _STATES.get(state, tfs.ModelVersionStatus.UNKNOWN)
    status = (
        tfs.StatusProto(error_code=UNAVAILABLE_CODE, error_message=reason)
        if tf_state == tfs.ModelVersionStatus.END
        else tfs.StatusProto(error_code=0)
    )
    return tfs.ModelVersionStatus(version=version, state=tf_state, status=status)


def _policy(
    name: str, spec: tfs.FileSystemStoragePathSourceConfig.ServableVersionPolicy
) -> VersionPolicy | None:
    """A ModelConfig's version policy as the core's (None: none chosen, the server's)."""
    which = spec.WhichOneof("policy_choice")
    if which == "latest":  # 0 (unset) is 1, as in TF Serving
        return VersionPolicy(latest=max(spec.latest.num_versions, 1))
    if which == "all":
        return VersionPolicy(latest=None)
    if which == "specific":
        versions = tuple(sorted(set(spec.specific.versions)))
        if not versions or versions[0] < 0:
            raise InvalidArgument(
                f"model {name}: a specific version policy names one or more versions >= 0"
            )
        return VersionPolicy(latest=None, specific=versions)
    return None


def _info(name: str, dtype: int, shape: list[int]) -> tf.TensorInfo:
    info = tf.TensorInfo(name=name, dtype=dtype)  # type: ignore[arg-type]
    for size in shape:
        info.tensor_shape.dim.add(size=size)
    return info


def _images(
    request: tfs.PredictRequest, max_images: int, charge: Callable[[int], None]
) -> np.ndarray:
    """The request's ``images`` tensor as uint8 ``[N, 28, 28]``.

    Typed values in TensorFlow's compact form expand (41 bytes can ask for 4,096 images):
    the images' bytes are ``charge``d to the server's byte budget before they are made, so
    a flood of them is refused like any other excess.
    """
    keys = sorted(request.inputs)
    if keys != [INPUT_NAME]:
        unknown = [k for k in keys if k != INPUT_NAME]
        if unknown:
            raise InvalidArgument(
                f"input tensor alias not found in signature: {bounded(unknown[0], 64)}. Inputs "
                f"expected "
                f"to be in the set {{{INPUT_NAME}}}."
            )
        raise InvalidArgument(f"the request has no input '{INPUT_NAME}'")
    tensor = request.inputs[INPUT_NAME]
    if tensor.dtype != tf.DT_UINT8:
        raise InvalidArgument(
            f"Expects arg[0] to be uint8 but {_DTYPE_NAMES.get(tensor.dtype, tensor.dtype)} "
            "is provided"
        )
    shape = [d.size for d in tensor.tensor_shape.dim]
    n = image_count(shape, max_images)
    size = n * IMAGE_BYTES
    if tensor.tensor_content:
        if len(tensor.tensor_content) != size:
            raise InvalidArgument(
                f"input '{INPUT_NAME}' has {len(tensor.tensor_content)} bytes of "
                f"tensor_content; shape {shape} needs {size}"
            )
        return np.frombuffer(tensor.tensor_content, np.uint8).reshape(n, *IMAGE_SHAPE)
    count = len(tensor.int_val)
    if not 0 < count <= size:
        raise InvalidArgument(
            f"input '{INPUT_NAME}' has {count} int_val values; shape {shape} needs "
            f"{size} (or fewer, the last repeated)"
        )
    values = np.asarray(tensor.int_val, np.int64)
    if values.min() < 0 or values.max() > 255:
        raise InvalidArgument(f"input '{INPUT_NAME}' has values outside 0-255 for uint8")
    charge(size)
    pixels = np.empty(size, np.uint8)
    pixels[:count] = values
    pixels[count:] = values[-1]  # TensorFlow's compact form: the last value fills the rest
    return pixels.reshape(n, *IMAGE_SHAPE)
