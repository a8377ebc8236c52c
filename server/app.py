"""Wiring: one server process, from its settings to a listening port, and its drain.

Request path: gRPC -> ``server.rpc`` / ``server.streams`` (admission, auth, status, metrics)
-> a protocol's converter (``server.servicer``, ``server.protocols.*``: its message to
arrays) -> :class:`~server.core.InferenceCore` (model lookup) -> ``server.batcher`` (queue,
coalesce) -> batcher thread -> ``ModelManager.predict`` -> the version's runtime -> back.

Where state lives: the served models in :class:`~server.repository.ModelRepository` (a
:class:`~server.manager.ModelManager` per model); the queues in
:class:`~server.batcher.DynamicBatcher`, one per loaded version (all the core's); calls in
flight and the drain in :class:`~server.calls.CallTracker`; SERVING or not in
:class:`~server.health.Health`.

The protocols this server speaks are the one list :data:`PROTOCOLS`: each declares its
services, methods and metrics label prefix (``server.protocols.base.ServingProtocol``);
registration, metrics gauges, tracing of streams, health and reflection follow from it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import rpc
from server.allocator import return_freed_memory
from server.batcher import DynamicBatcher
from server.calls import CallTracker
from server.core import InferenceCore
from server.health import Health
from server.manager import ModelManager, VersionLoader
from server.metrics import ServerMetrics
from server.metrics_http import MetricsServer
from server.monitoring import ModelMonitoring, PayloadLog
from server.protocols.base import ProtocolContext, ServingProtocol
from server.protocols.kserve import KServe
from server.protocols.pool import reflection_pool
from server.protocols.tfserving import TFServing
from server.servicer import SERVICE_NAME, DigitClassifier
from server.settings import Settings, read_token
from server.streams import StreamMethod
from server.versions import load_version
from server.worker_link import EXIT_CANNOT_START, REPORT_SECONDS, WorkerLink

if TYPE_CHECKING:
    from server.tracing import Tracing

log = logging.getLogger(__name__)

# After the last call in flight has finished, late calls keep getting an explicit UNAVAILABLE
# for this long before the port closes: gRPC's own stop would cancel a call that reached the
# transport but not yet a handler, which a client cannot tell from a lost request. Fixed, so
# the drain is bounded by the work in flight plus this.
QUIET_SECONDS = 0.3
# On SIGTERM, calls gRPC's transport had already received are still taken in once they reach
# the event loop (they may wait in gRPC's queue behind others); this bounds that wait.
RECEIVED_CALLS_WAIT_SECONDS = 5.0
# One model call running longer than this means the runtime hangs: health says NOT_SERVING
# (the longest real batch, 4,096 images of the CNN on one core, takes well under a second).
STUCK_MODEL_SECONDS = 10.0
HEALTH_CHECK_SECONDS = 1.0  # how often health re-reads conditions that change by themselves
EXIT_BATCHER_FAILED = 70  # EX_SOFTWARE: a supervisor should restart the process
# Every protocol this server speaks, on one port, all over the one inference core. Adding a
# protocol: a module whose class is built from a ProtocolContext and declares its services
# (server.protocols.base.ServingProtocol), and one entry here.
PROTOCOLS: tuple[Callable[[ProtocolContext], ServingProtocol], ...] = (
    DigitClassifier,
    KServe,
    TFServing,
)


def _channelz_server_ids() -> set[int]:
    """Ids of this process's gRPC servers in channelz (empty when channelz cannot tell)."""
    try:
        # channelz's own entry points, as grpcio-channelz's servicer reads them
        from grpc._cython import cygrpc  # type: ignore[attr-defined]

        ids: set[int] = set()
        start = 0
        while True:
            page = json.loads(cygrpc.channelz_get_servers(start))
            ids |= {int(server["ref"]["serverId"]) for server in page.get("server", [])}
            if page.get("end", True) or not ids:
                return ids
            start = max(ids) + 1
    except Exception:  # a private API: if it changes, the drain falls back to its time bound
        log.debug("channelz cannot list the servers", exc_info=True)
        return set()


def transport_calls(server_id: int | None) -> tuple[int, int] | None:
    """Calls gRPC's transport has received for the server with channelz id ``server_id``
    since it started, and of those the ones it has finished (channelz's ``callsStarted``,
    ``callsSucceeded + callsFailed``), or None when channelz cannot tell."""
    if server_id is None:
        return None
    try:
        from grpc._cython import cygrpc  # type: ignore[attr-defined]

        data = json.loads(cygrpc.channelz_get_server(server_id))["server"]["data"]
        finished = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
        return int(data.get("callsStarted", 0)), finished
    except Exception:
        log.debug("channelz cannot tell the calls received", exc_info=True)
        return None


def _pending_limit(limit: int) -> list[tuple[str, int]]:
    """gRPC's own limit on calls waiting for the event loop to take them up (0: gRPC's
    default). Overload queues there, ahead of any Python code, because the event loop takes
    one call at a time off gRPC's queue; past the limit gRPC drops new calls itself, at no
    cost to the server (early, at random, from half the limit on). The callers see CANCELLED:
    gRPC's C core (1.85) answers so, and no server code sees those calls."""
    if not limit:
        return []
    return [
        ("grpc.server.max_pending_requests", max(1, limit // 2)),
        ("grpc.server.max_pending_requests_hard_limit", limit),
    ]


def _monitoring(s: Settings) -> ModelMonitoring | None:
    """Model-quality monitoring as the settings ask (``server.monitoring``)."""
    if not s.model_monitoring:
        return None
    payload_log = None
    if s.payload_log_dir is not None:
        payload_log = PayloadLog(
            s.payload_log_dir, s.payload_log_percent, s.payload_log_images,
            int(s.payload_log_max_mb * 1024 * 1024),
        )  # fmt: skip
    return ModelMonitoring(s.drift_window_seconds, payload_log)


def _package_version() -> str:
    try:
        return importlib.metadata.version("mnist-serving")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ModelServer:
    """One running server. ``await start()``, then ``await stop()`` (or :func:`run`).

    With ``worker`` it is one of several processes on the port (``server.workers``): it binds
    with SO_REUSEPORT only once its model is loaded (so no connection reaches a worker that
    cannot serve it yet), serves no metrics port of its own (the supervisor sums everyone's),
    and answers health for itself.
    """

    def __init__(
        self,
        settings: Settings,
        worker: WorkerLink | None = None,
        tracer_provider: Any = None,
        loader: VersionLoader = load_version,
    ) -> None:
        """``loader`` loads a model version (``server.versions.load_version``; the fast
        tests' fake runtime comes in here)."""
        s = settings
        self.settings = s
        self.worker = worker
        self.metrics = ServerMetrics()
        self.calls = CallTracker(s.max_concurrent_rpcs, s.max_inflight_bytes, s.max_open_streams)
        self.monitoring = _monitoring(s)
        if self.monitoring is not None:
            self.metrics.registry.register(self.monitoring)
        self.core = InferenceCore.from_settings(
            s,
            self.metrics,
            monitoring=self.monitoring,
            on_failure=self._batcher_failed,
            # calls taken in that have not reached the batcher yet (a stream is not one: its
            # images come on their own schedule)
            arriving=lambda: self.calls.unary - self.core.unresolved,
            loader=loader,
        )
        self.repository = self.core.repository
        context = ProtocolContext(
            self.core, s, lambda: self.health.serving, self.metrics.stats, _package_version()
        )
        self.protocols = [make(context) for make in PROTOCOLS]
        self.tracing: Tracing | None = None
        if s.tracing == "otlp" or tracer_provider is not None:
            from server.tracing import Tracing, otlp_provider

            streams = [
                f"{service.name}/{name}"
                for protocol in self.protocols
                for service in protocol.services()
                for name in service.streams
            ]
            self.tracing = Tracing(tracer_provider or otlp_provider(), streams)
        # a call that ends without reaching the batcher may be what a filling batch waits for
        self.calls.on_finish = self.core.poke
        self.draining = False
        # at SIGTERM: how many calls the server must have taken off gRPC's queue to have
        # taken every call received by then
        self._arrived_goal: int | None = None
        self.channelz_id: int | None = None  # this server's id in gRPC's channelz
        self.health = Health(
            self.service_names(),
            self.metrics,
            [self._serves_itself],
            alive=lambda: self.core.alive,
            on_call=self.calls.arrive,
            on_return=self.calls.leave,
        )
        self.core.on_change = self.health.update  # a management call changed what serves
        self.exit_code = 0
        self.fatal = asyncio.Event()  # set when the process must stop (batcher failed)
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: MetricsServer | None = None
        self._follow: asyncio.Task[None] | None = None
        self._report: asyncio.Task[None] | None = None
        self._health_update: asyncio.Task[bool] | None = None  # kept: tasks are weakly held

    @property
    def manager(self) -> ModelManager:
        """The default model's manager (the only one in the one-model layout)."""
        return self.core.manager

    @property
    def batcher(self) -> DynamicBatcher | None:
        """The default version's batcher (each loaded version has its own)."""
        return self.core.batcher

    def _serves_itself(self) -> bool:
        return self.core.ready(STUCK_MODEL_SECONDS) and not self.draining

    def service_names(self) -> list[str]:
        """Every service the protocols declare (health answers for each, reflection lists
        them)."""
        return [service.name for protocol in self.protocols for service in protocol.services()]

    def _track_gauges(self, methods: list[str]) -> None:
        m = self.metrics
        for method in methods:
            m.track(m.inflight.labels(method), self._active_calls(method))

    def _active_calls(self, method: str) -> Callable[[], int]:
        return lambda: self.calls.active_by_method[method]

    def _services(self, auth: rpc.Authenticator) -> dict[str, dict[str, rpc.Method]]:
        """Every service this server answers, by name, with its methods, as the protocols
        declare them: each protocol only converts to the one core, and every method gets the
        same admission, auth, drain and metrics (the ``method`` label is the protocol's
        prefix and the method's name: ``kserve.ModelInfer``)."""
        s = self.settings
        timing, tracing = s.server_timing, self.tracing
        services: dict[str, dict[str, rpc.Method]] = {}
        for protocol in self.protocols:
            prefix = protocol.label_prefix
            for service in protocol.services():
                methods: dict[str, rpc.Method] = services.setdefault(service.name, {})
                for name, impl in service.unary.items():
                    methods[name] = rpc.UnaryMethod(
                        prefix + name, impl, self.calls, self.metrics, auth, timing, tracing,
                        read_timeout=s.read_timeout_seconds,
                    )  # fmt: skip
                for name, codec in service.streams.items():
                    methods[name] = StreamMethod(
                        prefix + name, codec, self.core, self.calls, self.metrics, auth,
                        window=s.max_stream_images, precondition=self.core.check_serving,
                        tracing=tracing, path=f"/{service.name}/{name}", server_timing=timing,
                        read_timeout=s.read_timeout_seconds, idle_timeout=s.stream_idle_seconds,
                    )  # fmt: skip
        return services

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def _build_grpc(self) -> grpc.aio.Server:
        s = self.settings
        others = _channelz_server_ids()
        server = grpc.aio.server(
            interceptors=self.tracing.interceptors() if self.tracing else None,
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.max_concurrent_streams", s.max_concurrent_streams),
                *_pending_limit(s.max_pending_calls),
                # workers share the port; a lone server must fail on a port already taken
                ("grpc.so_reuseport", 1 if self.worker is not None else 0),
            ],
        )
        ours = _channelz_server_ids() - others
        self.channelz_id = ours.pop() if len(ours) == 1 else None
        token = read_token(s.auth_token_file)
        auth = rpc.Authenticator(b"Bearer " + token if token is not None else None)
        labels = []
        for service, methods in self._services(auth).items():
            rpc.register(server, service, methods)
            labels += [m.name for m in methods.values()]
        self._track_gauges(labels)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection(
            [*self.service_names(), health.SERVICE_NAME, reflection.SERVICE_NAME],
            server,
            pool=reflection_pool(),
        )
        return server

    async def start(self) -> None:
        """Listen at once (NOT_SERVING), then load the model in the background.

        Health turns SERVING once a version is loaded, warmed up and checked. A worker loads
        its model first and only then listens (its peers serve the port meanwhile).
        """
        s = self.settings
        metrics_token = read_token(s.metrics_token_file)
        if self.worker is not None:
            await self._load_before_listening()
        self._grpc = self._build_grpc()
        creds = self._credentials()
        address = f"{s.host}:{s.port}"
        if creds is not None:
            self.port = self._grpc.add_secure_port(address, creds)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if self.worker is None:
            self._metrics_http = MetricsServer(
                s.metrics_host,
                s.metrics_port,
                self.metrics.registry,
                ready=lambda: self.health.serving,
                why_not=self.repository.waiting_for,
                token=metrics_token,
                tls_cert=s.metrics_tls_cert,
                tls_key=s.metrics_tls_key,
            )
            self.metrics_port = self._metrics_http.port
        self.core.start()
        await self._grpc.start()
        if self._metrics_http is not None:
            self._metrics_http.start()
        self.health.publish_to(s.ready_file, self._facts)
        await self.health.update()
        metrics_at = f"on {s.metrics_host}:{self.metrics_port}" if self._metrics_http else "summed"
        log.info(
            "listening: %s on %s:%d (%s), metrics %s", SERVICE_NAME, s.host, self.port,
            "TLS" if creds else "plaintext", metrics_at,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        self._follow = loop.create_task(self._load_and_follow())
        if self.worker is not None:
            self._report = loop.create_task(self._report_to_peers(self.worker))
        else:
            self._report = loop.create_task(self._recheck_health())

    async def _load_before_listening(self) -> None:
        """A worker's start: poll the model folder until a version is loaded."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.repository.refresh)
            except Exception:
                log.exception("model load failed")
            if self.repository.current is not None:
                return
            await asyncio.sleep(self.settings.poll_seconds)

    async def _recheck_health(self) -> None:
        """Re-read health now and then: a hung model call changes it without any event."""
        while True:
            await asyncio.sleep(HEALTH_CHECK_SECONDS)
            await self.health.update()

    async def _report_to_peers(self, worker: WorkerLink) -> None:
        """Tell the others whether this worker serves, and follow whether they all do."""
        while True:
            worker.report(self._serves_itself())
            await self.health.update()
            self.metrics.refresh()
            await asyncio.sleep(REPORT_SECONDS)

    def _facts(self) -> dict[str, Any]:
        model = self.repository.current
        return {
            "grpc_port": self.port,
            "metrics_port": self.metrics_port,
            "model_version": model.version if model else None,
            "model_load_seconds": model.load_seconds if model else None,
            "waiting_for": self.repository.waiting_for(),
        }

    async def _load_and_follow(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.repository.refresh)
        except Exception:
            log.exception("model load failed")
        await self.health.update()
        await self.repository.watch(self.settings.poll_seconds, self.health.update)

    def _batcher_failed(self, err: BaseException) -> None:
        log.critical("the batcher failed; stopping with exit status %d", EXIT_BATCHER_FAILED)
        self.exit_code = EXIT_BATCHER_FAILED
        self._health_update = asyncio.get_running_loop().create_task(self.health.update())
        self.fatal.set()

    def begin_drain(self) -> None:
        """The moment of SIGTERM: from now on NOT_SERVING; every call gRPC's transport has
        received until now will still be taken in (see :meth:`stop`)."""
        if self.draining:
            return
        self.draining = True
        queued = self._queued_in_grpc()
        self._arrived_goal = None if queued is None else self.calls.arrived + queued
        if self.worker is not None:
            self.worker.report(False)

    def _queued_in_grpc(self) -> int | None:
        """Calls waiting in gRPC's queue for the event loop: those the transport received
        and has not finished, less those whose handler runs (None: channelz cannot tell)."""
        counts = transport_calls(self.channelz_id)
        if counts is None:
            return None
        started, finished = counts
        return max(0, started - finished - self.calls.live)

    async def _empty_grpc_queue(self, limit: float, goal: int | None = None) -> None:
        """Wait, at most ``limit`` seconds, until nothing waits in gRPC's queue for the event
        loop (or, with ``goal``, until the server has taken that many calls off it in all:
        they leave the queue in order)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while self._queued_in_grpc() and loop.time() < end:
            if goal is not None and self.calls.arrived >= goal:
                return
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Drain: NOT_SERVING, pre-stop window, take in the calls gRPC had already received,
        refuse new calls, finish accepted ones, close.

        New calls are refused with UNAVAILABLE (an explicit, retryable answer) while every
        accepted call is finished; then, after :data:`QUIET_SECONDS`, the port closes. The
        wait for calls in flight is bounded by ``--grace-seconds``.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        log.info("shutting down: health NOT_SERVING, draining for up to %.1fs", s.grace_seconds)
        self.begin_drain()
        await self.health.update()
        for task in (self._follow, self._report):
            if task is not None:
                task.cancel()
        if s.pre_stop_seconds:
            await asyncio.sleep(s.pre_stop_seconds)
        deadline = loop.time() + s.grace_seconds
        # keep admitting until every call gRPC had received at SIGTERM is taken in (it may
        # wait in gRPC's queue behind others on a busy machine)
        if self._arrived_goal is not None:
            await self._empty_grpc_queue(
                min(s.grace_seconds, RECEIVED_CALLS_WAIT_SECONDS), self._arrived_goal
            )
        if not await self.calls.drain(s.grace_seconds):
            log.warning("grace period over with %d calls in flight", self.calls.active)
        try:
            await asyncio.wait_for(
                asyncio.shield(self.core.stop()), max(0.0, deadline - loop.time())
            )
        except TimeoutError:
            log.warning("grace period over with %d images queued", self.core.queued_images)
        await asyncio.sleep(QUIET_SECONDS)
        # gRPC's stop cancels the calls still queued inside it (the caller sees CANCELLED, not
        # the retryable UNAVAILABLE): let the last late ones reach a handler first
        await self._empty_grpc_queue(QUIET_SECONDS)
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - loop.time()))
        if self._metrics_http is not None:
            self._metrics_http.stop()
        if self.monitoring is not None:
            self.monitoring.close()
        answered = self.calls.answered
        self.health.write_final(answered=dict(answered))
        log.info(
            "stopped; answered %d requests: %s",
            sum(answered.values()),
            ", ".join(f"{code}={n}" for code, n in sorted(answered.items())) or "none",
        )


async def run(settings: Settings, worker: WorkerLink | None = None) -> int:
    """Serve until SIGTERM or SIGINT (or a fatal error), then drain; return the exit status."""
    return_freed_memory()  # before any request arrives
    server = ModelServer(settings, worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        server.begin_drain()  # at the signal: what gRPC has received by now will be answered
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
    except (OSError, ValueError, RuntimeError) as err:  # unreadable TLS/token file, port taken
        log.error("cannot start: %s", err)
        return EXIT_CANNOT_START
    waits = [loop.create_task(stop.wait()), loop.create_task(server.fatal.wait())]
    await asyncio.wait(waits, return_when="FIRST_COMPLETED")
    for wait in waits:
        wait.cancel()
    await server.stop()
    return server.exit_code
