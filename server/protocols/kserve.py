"""KServe v2 / Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

The six methods of the canonical proto (ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer), and Triton's ModelStreamInfer, ModelConfig, ModelStatistics and
model repository extension (RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload),
which tritonclient uses. The other Triton methods (shared memory, trace, logging) are not
registered, so gRPC answers UNIMPLEMENTED.

* ModelStatistics counts as Triton does: inference requests (success, fail, queue), including
  each request of a stream; model calls (execution count, and the three compute phases, whose
  counts are always equal: perf_analyzer refuses them otherwise), also per batch size.
* Stream answers carry ``triton_final_response`` and, for an error, its bare message.
* The repository extension (the core's management calls): RepositoryIndex lists every model
  of the repository and each of its versions on disk or loaded, with its state (READY,
  UNLOADING, UNAVAILABLE) and why it is not READY (a model with no version at all is one
  entry with no version); ``ready`` keeps the READY ones. It is always allowed.
  RepositoryModelLoad (re)loads a model, its versions as ``--version-policy`` says, or as its
  ``version_policy`` parameter (a string_param: ``latest:2``, ``all``, ``specific:1,3``)
  says; FAILED_PRECONDITION, saying why, when no version of it could load.
  RepositoryModelUnload unloads every version of it (calls already admitted finish; new ones
  get UNAVAILABLE saying it was unloaded) until it is loaded again. Both change the model
  folder's ``policy.json`` (every replica on the folder follows) and need ``--model-control``
  (else FAILED_PRECONDITION); an unknown model is NOT_FOUND. There is one repository: a
  ``repository_name`` is UNIMPLEMENTED, as are Triton's ``config`` and ``file:`` load
  parameters (models come from the folder only); other parameters are INVALID_ARGUMENT.

The model: name ``--model-name`` (``mnist``), its version the one being served; input
``images`` UINT8 ``[-1, 28, 28]``, output ``probabilities`` FP32 ``[-1, 10]``.

* Inputs come in ``raw_input_contents`` (what tritonclient sends) or typed in
  ``contents.uint_contents``, not both (INVALID_ARGUMENT, as in Triton); outputs always go
  in ``raw_output_contents`` (what tritonclient reads), little-endian.
* Requested outputs: none (all), or ``probabilities``. With Triton's ``classification``
  parameter (k) on it, the output is instead the top-k classes as BYTES ``"prob:digit"``,
  the classification extension (k above 10 is 10, as in Triton). Request ``id`` is copied
  into the answer. Other parameters are accepted and ignored.
* A wrong model name or version is NOT_FOUND; a wrong input name, datatype, shape or size,
  or an unknown output, is INVALID_ARGUMENT naming what was wrong.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from mnist_client.contract import (
    IMAGE_BYTES,
    IMAGE_SHAPE,
    INPUT_NAME,
    INPUT_SHAPE,
    NUM_CLASSES,
    OUTPUT_NAME,
    OUTPUT_SHAPE,
)
from mnist_client.timing import HEADER as TIMING_HEADER
from mnist_client.timing import format_server_timing
from server.batcher import Answer
from server.core import ModelStatus
from server.errors import InvalidArgument, NotFound, ServiceError, Unimplemented, bounded, quoted
from server.metrics import Duration
from server.protocols.base import ProtocolContext, Service, image_count, parse
from server.protocols.pb import open_inference_grpc_pb2 as oip
from server.protocols.pb import triton_extensions_pb2 as triton
from server.rpc import Call
from server.streams import ItemError
from server.versions import LoadedModel, VersionPolicy
from server.wire import float32_le

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "mnist-serving"
EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
    "binary_tensor_data",
)
# Triton marks every ModelStreamInfer answer with it (the last answer to its request, and here
# the only one): clients that wait for it (enable_empty_final_response) would wait forever.
FINAL_RESPONSE = "triton_final_response"
# RepositoryModelLoad's parameter for the versions to load (a string_param: "latest:2")
VERSION_POLICY_PARAMETER = "version_policy"
# RepositoryModelUnload's parameter of Triton's ensembles: accepted, there are none here
UNLOAD_DEPENDENTS_PARAMETER = "unload_dependents"


class KServe:
    """The KServe v2 methods, each a converter to the inference core."""

    label_prefix = "kserve."

    def __init__(self, context: ProtocolContext) -> None:
        self._core = context.core
        self._settings = context.settings
        self._serving = context.serving
        self._stats = context.stats
        self._version = context.server_version

    def services(self) -> list[Service]:
        """``inference.GRPCInferenceService``: the unary methods and ModelStreamInfer."""
        unary = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
            "ModelConfig": self.model_config,
            "ModelStatistics": self.model_statistics,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.repository_model_load,
            "RepositoryModelUnload": self.repository_model_unload,
        }
        return [Service(SERVICE, unary, {"ModelStreamInfer": self})]

    def _resolve(self, name: str, version: str) -> LoadedModel:
        """The core's version for a request's model name and version ("": the model's
        default). KServe names the model in every request: "" is no model (NOT_FOUND)."""
        if not name:
            raise NotFound(f"no model named; this server serves {self._core.repository.names()}")
        return self._core.resolve(name, version or None)

    # --- health and metadata

    async def server_live(self, raw: bytes, call: Call) -> bytes:
        parse(oip.ServerLiveRequest, raw)
        return oip.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, raw: bytes, call: Call) -> bytes:
        parse(oip.ServerReadyRequest, raw)
        return oip.ServerReadyResponse(ready=bool(self._serving())).SerializeToString()

    async def model_ready(self, raw: bytes, call: Call) -> bytes:
        request = parse(oip.ModelReadyRequest, raw)
        ready = self._core.model_ready(request.name, request.version or None)
        return oip.ModelReadyResponse(ready=ready).SerializeToString()

    async def server_metadata(self, raw: bytes, call: Call) -> bytes:
        parse(oip.ServerMetadataRequest, raw)
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
        ).SerializeToString()

    async def model_metadata(self, raw: bytes, call: Call) -> bytes:
        request = parse(oip.ModelMetadataRequest, raw)
        model = self._resolve(request.name, request.version)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            # the version asked for, or (none asked) every loaded one, the default's first
            versions=[str(model.version)]
            + (
                []
                if request.version
                else [
                    str(v) for v in sorted(self._core.routes(model).versions) if v != model.version
                ]
            ),
            platform=model.runtime_name,
            inputs=[tensor(name=INPUT_NAME, datatype="UINT8", shape=INPUT_SHAPE)],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=OUTPUT_SHAPE)],
        ).SerializeToString()

    async def model_config(self, raw: bytes, call: Call) -> bytes:
        request = parse(triton.ModelConfigRequest, raw)
        model = self._resolve(request.name, request.version)
        s = self._settings
        return triton.ModelConfigResponse(
            config=triton.ModelConfig(
                name=model.name,
                platform=model.runtime_name,
                backend=SERVER_NAME,
                runtime=model.runtime_name,
                max_batch_size=s.max_images_per_request,
                input=[triton.ModelInput(
                    name=INPUT_NAME, data_type=triton.TYPE_UINT8, dims=IMAGE_SHAPE
                )],
                output=[triton.ModelOutput(
                    name=OUTPUT_NAME, data_type=triton.TYPE_FP32, dims=[NUM_CLASSES]
                )],
                dynamic_batching=triton.ModelDynamicBatching(
                    max_queue_delay_microseconds=int(s.batch_timeout_ms * 1000)
                ),
            )
        ).SerializeToString()  # fmt: skip

    async def model_statistics(self, raw: bytes, call: Call) -> bytes:
        request = parse(triton.ModelStatisticsRequest, raw)
        # "" asks for every model; the statistics are the server's (every model's) alike
        model = self._core.resolve(request.name or None, request.version or None)
        st = self._stats
        return triton.ModelStatisticsResponse(
            model_stats=[triton.ModelStatistics(
                name=model.name,
                version=str(model.version),
                last_inference=int(st.last_inference * 1000),
                inference_count=st.images,
                execution_count=st.compute.count,
                inference_stats=triton.InferStatistics(
                    success=_duration(st.success), fail=_duration(st.fail),
                    queue=_duration(st.queue), compute_input=_duration(st.compute_input),
                    compute_infer=_duration(st.compute),
                    compute_output=_duration(st.compute_output),
                ),
                batch_stats=[triton.InferBatchStatistics(
                    batch_size=size, compute_input=_duration(b.compute_input),
                    compute_infer=_duration(b.compute_infer),
                    compute_output=_duration(b.compute_output),
                ) for size, b in sorted(st.batches.items())],
            )]
        ).SerializeToString()  # fmt: skip

    # --- the model repository extension

    async def repository_index(self, raw: bytes, call: Call) -> bytes:
        request = parse(triton.RepositoryIndexRequest, raw)
        _one_repository(request.repository_name)
        entry = triton.RepositoryIndexResponse.ModelIndex
        models = []
        for model in self._core.index():
            if not model.versions and not request.ready:  # a model with no version at all
                models.append(entry(name=model.name, state="UNAVAILABLE", reason=_why(model)))
            models += [
                entry(name=model.name, version=str(v.version), state=v.state, reason=v.reason)
                for v in model.versions
                if v.state == "READY" or not request.ready
            ]
        return triton.RepositoryIndexResponse(models=models).SerializeToString()

    async def repository_model_load(self, raw: bytes, call: Call) -> bytes:
        request = parse(triton.RepositoryModelLoadRequest, raw)
        self._core.check_control()  # first: with control off, nothing else matters
        _one_repository(request.repository_name)
        policy = None
        for key, value in sorted(request.parameters.items()):
            if key == VERSION_POLICY_PARAMETER:
                policy = _version_policy(value)
            elif key == "config" or key.startswith("file:"):
                raise Unimplemented(
                    f"load parameter {quoted(key)} is not supported: this server loads models "
                    f"from its model folder only (parameter '{VERSION_POLICY_PARAMETER}' "
                    "chooses the versions)"
                )
            else:
                raise InvalidArgument(
                    f"load parameter {quoted(key)} is not known; this server reads "
                    f"'{VERSION_POLICY_PARAMETER}' (a string: latest:N, all, specific:V1,V2)"
                )
        await self._core.load(_model_name(request.model_name), policy)
        return triton.RepositoryModelLoadResponse().SerializeToString()

    async def repository_model_unload(self, raw: bytes, call: Call) -> bytes:
        request = parse(triton.RepositoryModelUnloadRequest, raw)
        self._core.check_control()  # first: with control off, nothing else matters
        _one_repository(request.repository_name)
        for key in sorted(request.parameters):
            if key != UNLOAD_DEPENDENTS_PARAMETER:  # no ensembles here: no dependents
                raise InvalidArgument(
                    f"unload parameter {quoted(key)} is not known; this server reads "
                    f"'{UNLOAD_DEPENDENTS_PARAMETER}' only"
                )
        await self._core.unload(_model_name(request.model_name))
        return triton.RepositoryModelUnloadResponse().SerializeToString()

    # --- inference

    async def model_infer(self, raw: bytes, call: Call) -> bytes:
        request = parse(oip.ModelInferRequest, raw)
        images, model = self._images_of(request)
        call.images = len(images)
        answer = call.answer = await self._core.submit(images, model, call.deadline)
        return _answer(
            request, model.name, answer.probabilities, answer.versions
        ).SerializeToString()

    def _images_of(self, request: oip.ModelInferRequest) -> tuple[np.ndarray, LoadedModel]:
        """The request's images and the version for them, once its model (first, as
        Triton), outputs and parameters are checked."""
        model = self._resolve(request.model_name, request.model_version)
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise InvalidArgument(
                    f"output {quoted(output.name)} is not known; model "
                    f"'{model.name}' gives '{OUTPUT_NAME}'"
                )
        _classes(request)  # a bad classification parameter fails before any compute
        return _images(request, self._settings.max_images_per_request), model

    # --- ModelStreamInfer: the codec server.streams.StreamMethod reads and answers with

    def read(self, raw: bytes) -> tuple[Any, np.ndarray, LoadedModel]:
        """A stream's ModelInferRequest (its own key), its images and their version."""
        request = parse(oip.ModelInferRequest, raw)  # not a request: the stream is broken
        try:
            images, model = self._images_of(request)
        except ServiceError as err:  # this request's own error: answered, the stream goes on
            raise ItemError(request, err) from None
        return request, images, model

    def answer(self, key: Any, answer: Answer, total_s: float | None) -> bytes:
        """A ModelStreamInferResponse with the request's outputs (and its timing)."""
        response = _answer(key, key.model_name or self._core.model_name, answer.probabilities,
                           answer.versions)  # fmt: skip
        if total_s is not None:
            # the unary call's server-timing trailer, as a response parameter (a stream has
            # one trailer for all its answers)
            response.parameters[TIMING_HEADER].string_param = format_server_timing(
                answer.queue_s, answer.compute_s, total_s, answer.batch_size,
                int(answer.versions[-1]),
            )  # fmt: skip
        response.parameters[FINAL_RESPONSE].bool_param = True
        return triton.ModelStreamInferResponse(infer_response=response).SerializeToString()

    def fail(self, key: Any, error: ServiceError) -> bytes:
        """A ModelStreamInferResponse with the error's bare message, for the request."""
        echo = oip.ModelInferResponse(
            model_name=key.model_name, model_version=key.model_version, id=key.id
        )
        echo.parameters[FINAL_RESPONSE].bool_param = True
        # the bare message, as Triton writes it (a stream answer has no status code)
        return triton.ModelStreamInferResponse(
            error_message=error.message, infer_response=echo
        ).SerializeToString()


def _one_repository(name: str) -> None:
    """This server has one repository: naming one is not supported (Triton's answer)."""
    if name:
        raise Unimplemented(
            f"'repository_name' specification is not supported (got {quoted(name)}): this "
            "server has one model repository"
        )


def _model_name(name: str) -> str:
    if not name:
        raise InvalidArgument("model_name is required: name the model to load or unload")
    return name


def _version_policy(value: triton.ModelRepositoryParameter) -> VersionPolicy:
    """The ``version_policy`` load parameter: a string_param, not ``none`` (that is
    RepositoryModelUnload)."""
    if value.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(
            f"load parameter '{VERSION_POLICY_PARAMETER}' must be a string_param "
            "(latest:N, all or specific:V1,V2,...)"
        )
    try:
        policy = VersionPolicy.parse(value.string_param)
    except ValueError as err:
        raise InvalidArgument(f"load parameter '{VERSION_POLICY_PARAMETER}': {err}") from None
    if policy.loads_nothing:
        raise InvalidArgument(
            f"load parameter '{VERSION_POLICY_PARAMETER}' 'none' loads nothing: unload the "
            "model with RepositoryModelUnload"
        )
    return policy


def _why(model: ModelStatus) -> str:
    """Why a model with no version on disk serves nothing."""
    return f"no version of model '{model.name}' is in the repository (policy {model.policy})"


def _duration(d: Duration) -> triton.StatisticDuration:
    return triton.StatisticDuration(count=d.count, ns=int(d.seconds * 1e9))


def _images(request: oip.ModelInferRequest, max_images: int) -> np.ndarray:
    """The request's ``images`` input as uint8 ``[N, 28, 28]``."""
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        if not inputs:
            problem = "the request has no input"
        else:  # the first wrong one: the message names one problem, not the caller's list
            wrong = next((t.name for t in inputs if t.name != INPUT_NAME), INPUT_NAME)
            problem = (
                f"input {quoted(wrong)} is not known" if wrong != INPUT_NAME
                else f"{len(inputs)} inputs were sent"
            )  # fmt: skip
        raise InvalidArgument(f"{problem}; the model has one input '{INPUT_NAME}'")
    tensor = inputs[0]
    if tensor.datatype != "UINT8":
        raise InvalidArgument(
            f"input '{INPUT_NAME}' has datatype {bounded(tensor.datatype or '(none)', 32)}, "
            "expected UINT8"
        )
    shape = list(tensor.shape)
    n = image_count(shape, max_images)
    if request.raw_input_contents:
        if tensor.HasField("contents"):  # Triton refuses the ambiguity too
            raise InvalidArgument(
                f"contents field must not be specified when using raw_input_contents for "
                f"'{INPUT_NAME}'"
            )
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument("raw_input_contents must hold one entry per input (one)")
        data = request.raw_input_contents[0]
        if len(data) != n * IMAGE_BYTES:
            raise InvalidArgument(
                f"input '{INPUT_NAME}' has {len(data)} bytes of raw contents; shape {shape} "
                f"needs {n * IMAGE_BYTES}"
            )
        return np.frombuffer(data, np.uint8).reshape(n, *IMAGE_SHAPE)
    values = tensor.contents.uint_contents
    if len(values) != n * IMAGE_BYTES:
        raise InvalidArgument(
            f"input '{INPUT_NAME}' has {len(values)} values in contents.uint_contents; shape "
            f"{shape} needs {n * IMAGE_BYTES}"
        )
    array = np.asarray(values, np.uint32)
    if array.max(initial=0) > 255:
        raise InvalidArgument(f"input '{INPUT_NAME}' has values above 255 for UINT8")
    return array.astype(np.uint8).reshape(n, *IMAGE_SHAPE)


def _classes(request: oip.ModelInferRequest) -> int:
    """Triton's classification extension: the k of ``classification`` on the output, or 0.

    More classes than the model has are all of them, as Triton answers.
    """
    for output in request.outputs:
        param = output.parameters.get("classification")
        if param is not None:
            k = param.int64_param
            if k < 1:
                raise InvalidArgument(f"classification asks for {k} classes; at least 1")
            return int(min(k, NUM_CLASSES))
    return 0


def _answer(
    request: oip.ModelInferRequest, name: str, probs: np.ndarray, versions: np.ndarray
) -> oip.ModelInferResponse:
    n = len(probs)
    response = oip.ModelInferResponse(
        model_name=name, model_version=str(int(versions[-1])), id=request.id
    )
    k = _classes(request)
    if k:
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        cells = [f"{probs[i, c]:f}:{c}".encode() for i in range(n) for c in top[i]]
        response.outputs.add(name=OUTPUT_NAME, datatype="BYTES", shape=[n, k])
        response.raw_output_contents.append(b"".join(struct.pack("<I", len(c)) + c for c in cells))
        return response
    response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=[n, NUM_CLASSES])
    response.raw_output_contents.append(float32_le(probs))
    return response
