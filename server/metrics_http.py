"""The metrics port: ``/metrics`` for Prometheus, ``/readyz`` and ``/healthz`` for load balancers.

Bounded, unlike prometheus-client's own ``start_http_server`` (one thread per connection,
no timeouts): at most ``max_connections`` connections are served at once (more are closed at
once), each has ``timeout`` seconds to send its request and read the answer, and a TLS
handshake happens on the connection's own thread, never on the accepting one. With a token,
``/metrics`` wants ``Authorization: Bearer <token>``; the probes stay open, as gRPC health
does. The pages come from prometheus-client's WSGI app over the standard library's server.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class _BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        max_connections: int,
        timeout: float,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_connections)
        self._timeout = timeout
        self._tls = tls
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # full: refuse rather than queue
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self._timeout)
            if self._tls is not None:
                request = self._tls.wrap_socket(request, server_side=True)
            super().process_request_thread(request, client_address)
        except (OSError, ssl.SSLError):
            self.shutdown_request(request)
        finally:
            self._slots.release()


def _app(registry: CollectorRegistry, token: bytes | None, ready: Callable[[], bool]) -> WsgiApp:
    metrics_app = make_wsgi_app(registry)
    expected = b"Bearer " + token if token is not None else None

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/readyz", "/healthz"):
            ok = path == "/healthz" or ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])  # fmt: skip
            return [b"ok\n" if ok else b"not serving\n"]
        if expected is not None:
            presented = environ.get("HTTP_AUTHORIZATION", "").encode()
            if not hmac.compare_digest(presented, expected):
                start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer")])
                return [b"unauthorized\n"]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    return app


class MetricsServer:
    """The metrics port, served by a thread of its own until :meth:`stop`."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        ready: Callable[[], bool],
        token: bytes | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        max_connections: int = 16,
        timeout: float = 5.0,
    ) -> None:
        tls = None
        if tls_cert is not None and tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(tls_cert, tls_key)
        self._server = _BoundedServer((host, port), max_connections, timeout, tls)
        self._server.set_app(_app(registry, token, ready))
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
