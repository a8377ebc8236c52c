"""Wiring: model manager, batcher, gRPC server (service, health, reflection), metrics, signals.

Request path: gRPC (``server.rpc``: parse, auth, status, metrics) -> servicer (decode with
numpy) -> batcher (queue, coalesce) -> model thread (``ModelManager.predict``) -> back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from server.batcher import DynamicBatcher
from server.manager import ModelManager
from server.metrics import ServerMetrics
from server.model import configure_threads, pick_device
from server.rpc import SERVICE_NAME, add_digit_classifier
from server.servicer import DigitClassifierServicer
from server.settings import Settings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
QUIET_SECONDS = 0.3  # on shutdown, how long no call must arrive before the port closes


class ModelServer:
    """One running server. ``await start()``, then ``await stop()`` (or :func:`run`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.model_threads = configure_threads(settings.model_threads)
        self.device = pick_device(settings.runtime)
        self.manager = ModelManager(
            settings.model_dir,
            self.device,
            self.metrics,
            pinned_version=settings.model_version,
            runtime=settings.runtime,
            threads=self.model_threads,
        )
        self.batcher = DynamicBatcher(
            self.manager.predict,
            max_batch_size=settings.max_batch_size,
            max_queue_images=settings.max_queue_images,
            batch_timeout_s=settings.batch_timeout_ms / 1000.0,
            metrics=self.metrics,
            device=self.device,
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._serving = False

    def _auth_token(self) -> bytes | None:
        path = self.settings.auth_token_file
        if path is None:
            return None
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"{path}: token file is empty")
        return f"Bearer {token}".encode()

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

    async def start(self) -> None:
        """Load the model, then listen. Health turns SERVING once a version is warmed up."""
        s = self.settings
        await self._set_health(NOT_SERVING)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.manager.refresh)
        self.batcher.start()
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.max_concurrent_streams", s.max_concurrent_streams),
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = DigitClassifierServicer(self.batcher, self.manager, s)
        add_digit_classifier(self._grpc, servicer, self.metrics, self._auth_token())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._grpc
        )
        address = f"{s.host}:{s.port}"
        creds = self._credentials()
        if creds is not None:
            self.port = self._grpc.add_secure_port(address, creds)
        else:
            self.port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        metrics_http, _ = start_http_server(
            s.metrics_port, s.metrics_host, registry=self.metrics.registry
        )
        self._metrics_http = metrics_http
        self.metrics_port = metrics_http.server_port
        await self._follow_model()
        if s.model_version is None or self.manager.current is None:
            self._watcher = loop.create_task(self._watch(), name="model-watcher")
        log.info(
            "serving %s on %s:%d (%s), metrics on %s:%d, device %s, runtime %s, %d model threads",
            SERVICE_NAME,
            s.host,
            self.port,
            "TLS" if creds else "plaintext",
            s.metrics_host,
            self.metrics_port,
            self.device,
            s.runtime,
            self.model_threads,
        )

    async def _set_health(self, status: int) -> None:
        self._serving = status == SERVING
        self.metrics.serving.set(1 if self._serving else 0)
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _follow_model(self) -> None:
        if self.manager.current is not None and not self._serving:
            await self._set_health(SERVING)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                await loop.run_in_executor(None, self.manager.refresh)
            except Exception:  # a watcher that dies silently would freeze the version
                log.exception("model refresh failed")
            await self._follow_model()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, pre-stop window, refuse new work, finish accepted work, close.

        New requests are refused by the batcher with UNAVAILABLE (an explicit, retryable
        answer) while every accepted request is finished; only then is the gRPC server stopped,
        so the window in which a late call could be cut off by the transport is as short as
        it can be. All of it is bounded by ``--grace-seconds``.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        log.info("shutting down: health NOT_SERVING, draining for up to %.1fs", s.grace_seconds)
        await self._set_health(NOT_SERVING)
        if self._watcher is not None:
            self._watcher.cancel()
        if s.pre_stop_seconds:
            await asyncio.sleep(s.pre_stop_seconds)
        deadline = loop.time() + s.grace_seconds
        try:
            await asyncio.wait_for(asyncio.shield(self.batcher.stop()), s.grace_seconds)
        except TimeoutError:
            log.warning("grace period over with %d images queued", self.batcher.queued_images)
        await self._wait_until_quiet(deadline)
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - loop.time()))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        answered = self.metrics.requests_by_code()
        log.info(
            "stopped; answered %d requests: %s",
            sum(answered.values()),
            ", ".join(f"{code}={n}" for code, n in sorted(answered.items())) or "none",
        )

    async def _wait_until_quiet(self, deadline: float) -> None:
        """Keep refusing late calls (UNAVAILABLE) until none arrive for a moment.

        gRPC's own stop cancels calls that reached the transport but not yet a handler; a
        client still sending sees those as CANCELLED, which it cannot tell from a lost
        request. Waiting for a quiet moment first gives every late call an explicit answer.
        """
        loop = asyncio.get_running_loop()
        total = sum(self.metrics.requests_by_code().values())
        last_change = loop.time()
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            now_total = sum(self.metrics.requests_by_code().values())
            if now_total != total:
                total, last_change = now_total, loop.time()
            elif loop.time() - last_change >= QUIET_SECONDS and not self.metrics.inflight_total():
                return


async def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then drain and return the exit status."""
    server = ModelServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (OSError, ValueError, RuntimeError) as err:  # unreadable TLS/token file, port taken
        log.error("cannot start: %s", err)
        return 2
    await stop.wait()
    await server.stop()
    return 0


def check_model_dir(path: Path) -> None:
    """Fail early on a model dir that cannot exist (it may be empty: versions can arrive later)."""
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{path}: --model-dir is not a directory")
