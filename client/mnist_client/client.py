"""Blocking and asyncio clients for the ``mnist.v1.DigitClassifier`` service.

Both clients share one channel configuration: a default deadline per call that the caller can
override, and gRPC's own retry policy (service config) that retries UNAVAILABLE with
exponential backoff and nothing else: a request the server refused as wrong or too much
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) is never resent; one it could not take now
(UNAVAILABLE: starting, draining, gone) is tried again, possibly on another replica.
"""

from __future__ import annotations

import collections
import json
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np

from mnist_client import health_codec
from mnist_client.images import ImageError, to_batch, to_image_bytes
from mnist_client.pb import digit_classifier_pb2 as pb
from mnist_client.pb import digit_classifier_pb2_grpc as pb_grpc
from mnist_client.timing import Timing, from_metadata

DEFAULT_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAME = "mnist.v1.DigitClassifier"

LOAD_BALANCING = ("pick_first", "round_robin")


def service_config(load_balancing: str = "pick_first") -> str:
    """The channel's service config: retry UNAVAILABLE (only), and the balancing policy.

    With ``round_robin`` the channel connects to every address the target resolves to and
    spreads calls over them; it also watches each one's standard health service and sends
    nothing to a replica that is not SERVING (loading, draining). A retried call is a new
    pick, so a refusal from a draining replica is retried on another.
    """
    if load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING}")
    config: dict[str, Any] = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "loadBalancingConfig": [{load_balancing: {}}],
    }
    if load_balancing == "round_robin":
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the digit, the 10 class probabilities and the model version, and
    where its time went on the server (``timing``; None from a server that does not say)."""

    digit: int
    probabilities: np.ndarray
    model_version: int
    timing: Timing | None = None

    @property
    def confidence(self) -> float:
        """Probability of the predicted digit."""
        return float(self.probabilities[self.digit])


@dataclass(frozen=True)
class BatchPrediction:
    """Answers for many images, in request order; index it for one :class:`Prediction`."""

    digits: np.ndarray  # [N] int
    probabilities: np.ndarray  # [N, 10] float32
    model_versions: np.ndarray  # [N] int64
    timing: Timing | None = None  # the whole call's, from the server-timing trailer

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> Prediction:
        return Prediction(
            int(self.digits[i]), self.probabilities[i], int(self.model_versions[i]), self.timing
        )


@dataclass(frozen=True)
class PredictionError:
    """Why one image of a stream got no prediction: a gRPC status code and a message."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class StreamResult:
    """One answer of :meth:`DigitClient.predict_stream`: the image's index in the input, and
    its prediction or its error (exactly one of the two is set)."""

    id: int
    prediction: Prediction | None = None
    error: PredictionError | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None


@dataclass(frozen=True)
class ModelInfo:
    """What the server is serving (see ``GetModelInfo`` in the proto)."""

    model_version: int
    architecture: str
    test_accuracy: float
    device: str
    input_shape: tuple[int, ...]
    input_dtype: str
    batching: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    loaded_at: str = ""
    last_failed_version: int = 0
    last_failure: str = ""
    runtime: str = ""  # "litert", "keras" or "tensorflow"; empty from older servers
    memory_bytes: int = 0  # estimated memory this version holds; 0 from older servers
    loaded_versions: tuple[int, ...] = ()  # every loaded version; empty from older servers
    labels: dict[str, int] = field(default_factory=dict)  # label -> the version it points at
    # every version on disk or loaded, with its state; empty from older servers
    versions: tuple[VersionStatus, ...] = ()
    model_name: str = ""  # the model's name; empty from older servers


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model as the repository sees it (see ``ListModels`` in the proto)."""

    version: int
    state: str  # READY, UNLOADING (finishing the calls it admitted) or UNAVAILABLE
    reason: str = ""  # why it is not READY ("" when it is)


@dataclass(frozen=True)
class ModelStatus:
    """One model as it serves: its version policy, every version on disk or loaded with its
    state, the labels that point at a loaded version and the version unpinned calls get."""

    name: str
    version_policy: str  # "latest:N", "all", "specific:V1,V2,..." or "none" (unloaded)
    versions: tuple[VersionStatus, ...] = ()  # ascending
    labels: dict[str, int] = field(default_factory=dict)  # label -> the version it points at
    default_version: int | None = None  # None: no version is loaded

    @property
    def loaded_versions(self) -> tuple[int, ...]:
        """The READY versions, ascending."""
        return tuple(v.version for v in self.versions if v.state == "READY")

    def labels_of(self, version: int) -> list[str]:
        """The labels that point at ``version``, sorted."""
        return sorted(label for label, v in self.labels.items() if v == version)


def _model_status(resp: pb.ModelStatus) -> ModelStatus:
    return ModelStatus(
        name=resp.name,
        version_policy=resp.version_policy,
        versions=tuple(VersionStatus(v.version, v.state, v.reason) for v in resp.versions),
        labels=dict(resp.labels),
        default_version=resp.default_version or None,
    )


def _load_request(name: str, version_policy: str | None) -> pb.ConfigureModelRequest:
    return pb.ConfigureModelRequest(name=name, load=True, version_policy=version_policy)


def _labels_request(name: str, labels: Mapping[str, int]) -> pb.ConfigureModelRequest:
    return pb.ConfigureModelRequest(name=name, labels=dict(labels), set_labels=True)


def _policy_request(name: str, policy: str | None) -> pb.ConfigureModelRequest:
    return pb.ConfigureModelRequest(name=name, version_policy=policy or "")


def _spec(version: int | None, label: str | None, model: str | None = None) -> pb.ModelSpec | None:
    """The request's ModelSpec: for ``model`` (None: the server's default model), pinned to
    ``version`` or ``label`` (None: that model's default version)."""
    if version is None and not label and not model:
        return None
    spec = pb.ModelSpec(name=model or "", label=label or "")
    if version is not None:
        spec.version = version
    return spec


def _predict_request(
    image: Any, version: int | None = None, label: str | None = None, model: str | None = None
) -> pb.PredictRequest:
    return pb.PredictRequest(image=to_image_bytes(image), model_spec=_spec(version, label, model))


def _batch_request(
    images: Any, version: int | None = None, label: str | None = None, model: str | None = None
) -> pb.BatchPredictRequest:
    return pb.BatchPredictRequest(images=to_batch(images), model_spec=_spec(version, label, model))


def _info_request(
    version: int | None, label: str | None, model: str | None = None
) -> pb.GetModelInfoRequest:
    return pb.GetModelInfoRequest(model_spec=_spec(version, label, model))


def _prediction(resp: pb.PredictResponse, timing: Timing | None = None) -> Prediction:
    probs = np.array(resp.probabilities, np.float32)
    return Prediction(resp.digit, probs, resp.model_version, timing)


def _batch_prediction(resp: pb.BatchPredictResponse, timing: Timing | None) -> BatchPrediction:
    probs = np.array(resp.probabilities, np.float32).reshape(-1, 10)
    return BatchPrediction(
        np.array(resp.digits, np.int64), probs, np.array(resp.model_versions, np.int64), timing
    )


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def _stream_result(resp: pb.PredictStreamResponse) -> StreamResult:
    if resp.HasField("prediction"):
        timing = None
        if resp.HasField("timing"):
            t = resp.timing
            version = resp.prediction.model_version
            timing = Timing(t.queue_ms, t.compute_ms, t.total_ms, t.batch_size, version)
        return StreamResult(resp.id, prediction=_prediction(resp.prediction, timing))
    code = _STATUS_BY_VALUE.get(resp.error.code, grpc.StatusCode.UNKNOWN)
    return StreamResult(resp.id, error=PredictionError(code, resp.error.message))


class _StreamRequests:
    """The request messages of a stream, converted one by one as gRPC asks for them.

    An image that cannot be converted (wrong size, unreadable file) is not sent: its answer,
    an INVALID_ARGUMENT error under its id, is kept in ``local`` and handed out among the
    server's answers, and the stream goes on, as for an image the server refuses. The
    caller's own iterator raising ends the stream: images already sent are still answered,
    and the error is kept in ``error`` to be raised after the answers, instead of becoming an
    opaque CANCELLED inside gRPC.
    """

    def __init__(self, spec: pb.ModelSpec | None = None) -> None:
        self._spec = spec  # every message's pin (None: the default version)
        self._next_id = 0
        self.error: Exception | None = None
        # answers made here (appended on gRPC's thread, taken on the caller's)
        self.local: collections.deque[StreamResult] = collections.deque()

    def _message(self, image: Any) -> pb.PredictStreamRequest | None:
        request_id = self._next_id
        self._next_id += 1
        try:
            return pb.PredictStreamRequest(
                id=request_id, image=to_image_bytes(image), model_spec=self._spec
            )
        except ImageError as err:
            code = grpc.StatusCode.INVALID_ARGUMENT
            self.local.append(StreamResult(request_id, error=PredictionError(code, str(err))))
            return None

    def of(self, images: Iterable[Any]) -> Iterator[pb.PredictStreamRequest]:
        """Messages for an iterable of images."""
        try:
            for image in images:
                message = self._message(image)
                if message is not None:
                    yield message
        except Exception as err:  # the caller's: kept, raised after the answers
            self.error = err

    async def of_async(self, images: AsyncIterable[Any]) -> AsyncIterator[pb.PredictStreamRequest]:
        """Messages for an async iterable of images."""
        try:
            async for image in images:
                message = self._message(image)
                if message is not None:
                    yield message
        except Exception as err:  # the caller's: kept, raised after the answers
            self.error = err

    def take_local(self) -> Iterator[StreamResult]:
        """The answers made here so far."""
        while self.local:
            yield self.local.popleft()


def _model_info(resp: pb.GetModelInfoResponse) -> ModelInfo:
    b = resp.batching
    return ModelInfo(
        model_version=resp.model_version,
        architecture=resp.architecture,
        test_accuracy=resp.test_accuracy,
        device=resp.device,
        runtime=resp.runtime,
        input_shape=tuple(resp.input.shape),
        input_dtype=resp.input.dtype,
        batching={
            "max_batch_size": b.max_batch_size,
            "batch_timeout_ms": b.batch_timeout_ms,
            "max_queue_images": b.max_queue_images,
            "max_images_per_request": b.max_images_per_request,
        },
        metadata=json.loads(resp.metadata_json) if resp.metadata_json else {},
        loaded_at=resp.loaded_at,
        last_failed_version=resp.last_failed_version,
        last_failure=resp.last_failure,
        memory_bytes=resp.memory_bytes,
        loaded_versions=tuple(resp.loaded_versions),
        labels=dict(resp.labels),
        versions=tuple(VersionStatus(v.version, v.state, v.reason) for v in resp.versions),
        model_name=resp.model_name,
    )


def _unknown_service_or_raise(err: grpc.RpcError) -> str:
    # The health protocol answers NOT_FOUND for a service it does not know.
    if err.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
        return "SERVICE_UNKNOWN"
    raise err


def _channel_options(
    extra: Sequence[tuple[str, Any]], load_balancing: str
) -> list[tuple[str, Any]]:
    # gRPC keeps the first of repeated channel args: the caller's own options go first
    return [
        *extra,
        ("grpc.service_config", service_config(load_balancing)),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


@dataclass(frozen=True)
class _ChannelConfig:
    target: str
    timeout: float
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]
    options: list[tuple[str, Any]]


def _config(
    target: str,
    timeout: float,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
    token: str | None,
    options: Sequence[tuple[str, Any]],
    load_balancing: str,
) -> _ChannelConfig:
    creds = None
    if root_certificates is not None or certificate_chain is not None:
        creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return _ChannelConfig(
        target, timeout, creds, metadata, _channel_options(options, load_balancing)
    )


try:  # with OpenTelemetry installed, calls carry the caller's trace context (traceparent)
    from opentelemetry import propagate as _propagate
except ImportError:  # pragma: no cover - the SDK does not require it
    _propagate = None  # type: ignore[assignment]


def _trace_context() -> tuple[tuple[str, str], ...]:
    """The current span's W3C ``traceparent`` (and ``tracestate``) as call metadata."""
    if _propagate is None:
        return ()
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return tuple(carrier.items())


class _ClientBase:
    """Channel set-up shared by both clients; ``_channels`` is ``grpc`` or ``grpc.aio``."""

    _channels: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        load_balancing: str = "pick_first",
    ) -> None:
        self._cfg = _config(
            target, timeout, root_certificates, private_key, certificate_chain, token, options,
            load_balancing,
        )  # fmt: skip
        if self._cfg.credentials is not None:
            self._channel = self._channels.secure_channel(
                target, self._cfg.credentials, self._cfg.options
            )
        else:
            self._channel = self._channels.insecure_channel(target, self._cfg.options)
        self._stub = pb_grpc.DigitClassifierStub(self._channel)
        self._health = self._channel.unary_unary(
            health_codec.CHECK_METHOD,
            request_serializer=health_codec.encode_request,
            response_deserializer=health_codec.decode_response,
        )

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self._cfg.timeout if timeout is None else timeout,
            "metadata": self._cfg.metadata + _trace_context(),
        }

    def _stream_kw(self, timeout: float | None) -> dict[str, Any]:
        # a stream lasts as long as its input: no deadline unless the caller gives one
        return {"timeout": timeout, "metadata": self._cfg.metadata + _trace_context()}


class DigitClient(_ClientBase):
    """Blocking client. ``with DigitClient("localhost:8500") as c: c.predict(image)``.

    Args:
        target: ``host:port`` of the server.
        timeout: default deadline of each call, in seconds; every method takes ``timeout=``.
            A stream has no deadline unless ``predict_stream`` is given one: it lasts as long
            as its input.
        root_certificates: PEM CA bundle to verify the server (enables TLS).
        private_key, certificate_chain: PEM client key and certificate, for mutual TLS.
        token: bearer token sent as ``authorization`` metadata when the server requires one.
        options: extra gRPC channel options (they take precedence over the defaults).
        load_balancing: ``pick_first`` (gRPC's default: one connection) or ``round_robin``
            (every address of the target, e.g. ``dns:///mnist-headless:8500`` or
            ``ipv4:10.0.0.1:8500,10.0.0.2:8500``, calls spread per call, replicas that are not
            SERVING skipped; see :func:`service_config`).
    """

    _channels = grpc

    def predict(
        self,
        image: Any,
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> Prediction:
        """Classify one image (array, 784 bytes, path or PIL image).

        ``version`` pins a loaded version, ``label`` the version a label (``stable``,
        ``canary``) points at when the call is admitted; neither: the default version.
        ``model`` names the model (a server with several); None: the server's default model.
        A model, version or label that is not served raises NOT_FOUND naming what is.
        """
        request = _predict_request(image, version, label, model)
        resp, call = self._stub.Predict.with_call(request, **self._kw(timeout))
        return _prediction(resp, from_metadata(call.trailing_metadata()))

    def batch_predict(
        self,
        images: Any,
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> BatchPrediction:
        """Classify many images in one call; answers come back in order (``version`` and
        ``label`` as for :meth:`predict`)."""
        request = _batch_request(images, version, label, model)
        resp, call = self._stub.BatchPredict.with_call(request, **self._kw(timeout))
        return _batch_prediction(resp, from_metadata(call.trailing_metadata()))

    def predict_stream(
        self,
        images: Iterable[Any],
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> Iterator[StreamResult]:
        """Classify many images over one stream; yield each answer as it arrives.

        ``images`` may be any iterable (a generator is read as the server takes images in);
        answers may come out of order: each carries its image's index in ``images``. An image
        the server cannot read gets an answer with ``error`` set; the stream goes on.
        ``version`` and ``label`` pin every image (as for :meth:`predict`); each image is
        resolved as the server reads it.
        """
        requests = _StreamRequests(_spec(version, label, model))
        for resp in self._stub.PredictStream(requests.of(images), **self._stream_kw(timeout)):
            yield from requests.take_local()
            yield _stream_result(resp)
        yield from requests.take_local()
        if requests.error is not None:
            raise requests.error

    def model_info(
        self,
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> ModelInfo:
        """The model version (the default, or ``version``/``label``), architecture, device,
        batching settings, loaded versions and labels."""
        request = _info_request(version, label, model)
        return _model_info(self._stub.GetModelInfo(request, **self._kw(timeout)))

    # --- the model repository (ListModels, ConfigureModel)

    def list_models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """Every model in the server's repository, by name, with every version on disk or
        loaded and its state, the labels and the default version. Always allowed."""
        resp = self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout))
        return [_model_status(m) for m in resp.models]

    def load_model(
        self, name: str, version_policy: str | None = None, *, timeout: float | None = None
    ) -> ModelStatus:
        """Load model ``name`` ("": the server's default model) with ``version_policy``
        (``"latest:2"``, ``"all"``, ``"specific:1,3"``; None: the server's
        ``--version-policy``), a model folder added since the server started too; the model
        as it serves once loaded.

        The management calls (this one, :meth:`unload_model`, :meth:`set_labels`,
        :meth:`set_version_policy`) change the model folder, so every worker and replica on it
        follows, and raise ``grpc.RpcError``: FAILED_PRECONDITION when the server runs
        without ``--model-control``, when no version could be loaded (saying why) or a label
        would point at a version that is not loaded; NOT_FOUND for a model not in the
        repository; INVALID_ARGUMENT for a policy that does not parse. Loading verifies and
        warms each version up: give a large model a ``timeout`` to match.
        """
        request = _load_request(name, version_policy)
        return _model_status(self._stub.ConfigureModel(request, **self._kw(timeout)))

    def unload_model(self, name: str, *, timeout: float | None = None) -> ModelStatus:
        """Unload every version of model ``name`` (its policy becomes ``none`` until it is
        loaded again); calls already admitted finish. Errors as :meth:`load_model`."""
        request = pb.ConfigureModelRequest(name=name, unload=True)
        return _model_status(self._stub.ConfigureModel(request, **self._kw(timeout)))

    def set_labels(
        self, name: str, labels: Mapping[str, int], *, timeout: float | None = None
    ) -> ModelStatus:
        """Replace every label of model ``name`` with ``labels`` (label -> a loaded
        version; ``{}`` removes them all): a rollback is ``set_labels("mnist", {"stable":
        2})``. Calls admitted from then on follow; nothing loads or unloads. A label that
        would point at a version that is not loaded is FAILED_PRECONDITION and changes
        nothing. Errors as :meth:`load_model`."""
        request = _labels_request(name, labels)
        return _model_status(self._stub.ConfigureModel(request, **self._kw(timeout)))

    def set_version_policy(
        self, name: str, policy: str | None, *, timeout: float | None = None
    ) -> ModelStatus:
        """Set the version policy of model ``name`` (``"latest:2"``, ``"all"``,
        ``"specific:1,3"``, ``"none"``; None: back to the server's ``--version-policy``) and
        load and unload as it says before answering. Errors as :meth:`load_model`."""
        request = _policy_request(name, policy)
        return _model_status(self._stub.ConfigureModel(request, **self._kw(timeout)))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health status: ``"SERVING"``, ``"NOT_SERVING"``, ``"SERVICE_UNKNOWN"``."""
        try:
            return str(self._health(service, **self._kw(timeout)))
        except grpc.RpcError as err:
            return _unknown_service_or_raise(err)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> DigitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDigitClient(_ClientBase):
    """The asyncio twin of :class:`DigitClient`: same arguments, awaitable methods.

    ``async with AsyncDigitClient("localhost:8500") as c: await c.predict(image)``
    """

    _channels = grpc.aio

    async def predict(
        self,
        image: Any,
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> Prediction:
        """Classify one image (see :meth:`DigitClient.predict`)."""
        request = _predict_request(image, version, label, model)
        call = self._stub.Predict(request, **self._kw(timeout))
        resp = await call
        return _prediction(resp, from_metadata(await call.trailing_metadata()))

    async def batch_predict(
        self,
        images: Any,
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> BatchPrediction:
        """Classify many images in one call (see :meth:`DigitClient.batch_predict`)."""
        request = _batch_request(images, version, label, model)
        call = self._stub.BatchPredict(request, **self._kw(timeout))
        resp = await call
        return _batch_prediction(resp, from_metadata(await call.trailing_metadata()))

    async def predict_stream(
        self,
        images: Iterable[Any] | AsyncIterable[Any],
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> AsyncIterator[StreamResult]:
        """The asyncio twin of :meth:`DigitClient.predict_stream`: an async iterator.

        ``images`` may also be an async iterable, for a producer that must wait (for images
        to arrive, or for answers before it sends more).
        """
        requests = _StreamRequests(_spec(version, label, model))
        source = requests.of(images) if isinstance(images, Iterable) else requests.of_async(images)
        call = self._stub.PredictStream(source, **self._stream_kw(timeout))
        async for resp in call:
            for result in requests.take_local():
                yield result
            yield _stream_result(resp)
        for result in requests.take_local():
            yield result
        if requests.error is not None:
            raise requests.error

    async def model_info(
        self,
        *,
        timeout: float | None = None,
        version: int | None = None,
        label: str | None = None,
        model: str | None = None,
    ) -> ModelInfo:
        """See :meth:`DigitClient.model_info`."""
        req = _info_request(version, label, model)
        return _model_info(await self._stub.GetModelInfo(req, **self._kw(timeout)))

    # --- the model repository (see DigitClient's)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """See :meth:`DigitClient.list_models`."""
        resp = await self._stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout))
        return [_model_status(m) for m in resp.models]

    async def load_model(
        self, name: str, version_policy: str | None = None, *, timeout: float | None = None
    ) -> ModelStatus:
        """See :meth:`DigitClient.load_model`."""
        request = _load_request(name, version_policy)
        return _model_status(await self._stub.ConfigureModel(request, **self._kw(timeout)))

    async def unload_model(self, name: str, *, timeout: float | None = None) -> ModelStatus:
        """See :meth:`DigitClient.unload_model`."""
        request = pb.ConfigureModelRequest(name=name, unload=True)
        return _model_status(await self._stub.ConfigureModel(request, **self._kw(timeout)))

    async def set_labels(
        self, name: str, labels: Mapping[str, int], *, timeout: float | None = None
    ) -> ModelStatus:
        """See :meth:`DigitClient.set_labels`."""
        request = _labels_request(name, labels)
        return _model_status(await self._stub.ConfigureModel(request, **self._kw(timeout)))

    async def set_version_policy(
        self, name: str, policy: str | None, *, timeout: float | None = None
    ) -> ModelStatus:
        """See :meth:`DigitClient.set_version_policy`."""
        request = _policy_request(name, policy)
        return _model_status(await self._stub.ConfigureModel(request, **self._kw(timeout)))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health status: ``"SERVING"``, ``"NOT_SERVING"``, ``"SERVICE_UNKNOWN"``."""
        try:
            return str(await self._health(service, **self._kw(timeout)))
        except grpc.RpcError as err:
            return _unknown_service_or_raise(err)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncDigitClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
