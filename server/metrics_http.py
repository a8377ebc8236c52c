"""The metrics port: ``/metrics`` for Prometheus, ``/readyz`` and ``/healthz`` for load balancers.

An asyncio HTTP/1.1 server on a thread of its own, so a connection that is open but silent
costs a coroutine, not a thread: 300 half-open connections (or thousands) cannot keep a probe
from being answered. Each connection has ``timeout`` seconds to send its request head (at
most 16 KiB) and read the answer, then it is closed; past ``max_connections`` open at once
the oldest is closed to make room for the newest, so whoever holds connections open cannot
keep others out. TLS handshakes run on the same loop, bounded by the same timeout. Every
answer closes its connection (``Connection: close``), which Prometheus and probes handle.

With a token, ``/metrics`` wants ``Authorization: Bearer <token>``; the probes stay open, as
gRPC health does. The page itself is prometheus-client's (its encoder chosen from the
``Accept`` header, gzip when asked, ``name[]`` to select series).

Hand-written over ``asyncio.start_server`` rather than a web framework: the standard
library's threaded server (one thread per connection) is what half-open connections
exhausted, and no framework bounds the time to read a request head, which is the whole point.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


class _BadRequest(Exception):
    pass


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and headers (lower-case names) of an HTTP/1.x request head."""
    try:
        text = head.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _BadRequest from None
    if not version.startswith("HTTP/1."):
        raise _BadRequest
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


class MetricsServer:
    """The metrics port, served by a thread of its own until :meth:`stop`."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        ready: Callable[[], bool],
        why_not: Callable[[], str | None] = lambda: None,
        token: bytes | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        max_connections: int = 1024,
        timeout: float = 5.0,
    ) -> None:
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None and tls_key is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(tls_cert, tls_key)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family, backlog=1024)
        except OSError as err:
            raise OSError(err.errno, f"metrics port {host}:{port}: {err.strerror}") from None
        self.port: int = self._sock.getsockname()[1]
        self._registry = registry
        self._ready = ready
        self._why_not = why_not  # what /readyz says besides "not serving"
        self._expected = b"Bearer " + token if token is not None else None
        self._max_connections = max_connections
        self._timeout = timeout
        # open connections, oldest first: the oldest is closed when a new one needs room
        self._open: dict[asyncio.StreamWriter, None] = {}
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    def start(self) -> None:
        started = threading.Event()
        self._loop.call_soon(started.set)
        self._thread.start()
        started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(
                self._handle, sock=self._sock, ssl=self._tls,
                ssl_handshake_timeout=self._timeout if self._tls else None,
                limit=MAX_HEAD_BYTES,
            )
        )  # fmt: skip
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        if not self._thread.is_alive():
            self._sock.close()
            return

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                writer.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self._max_connections:
            oldest = next(iter(self._open))
            self._open.pop(oldest)
            oldest.close()
        self._open[writer] = None
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    status, headers, body = self._answer(*_parse_head(head))
                except (_BadRequest, asyncio.LimitOverrunError):
                    status, headers, body = 400, [("Content-Type", "text/plain")], b"bad request\n"
                lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"]
                lines += [f"{name}: {value}" for name, value in headers]
                lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
                writer.write("\r\n".join(lines).encode("latin-1") + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # a silent, slow or vanished client: its connection is closed below
        except Exception:  # never let one connection take the port down
            log.exception("metrics port: answering a request failed")
        finally:
            self._open.pop(writer, None)
            writer.close()

    def _answer(
        self, method: str, target: str, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if method not in ("GET", "HEAD"):
            return 405, [("Allow", "GET, HEAD")], b""
        url = urlsplit(target)
        text = [("Content-Type", "text/plain")]
        if url.path in ("/readyz", "/healthz"):
            ok = url.path == "/healthz" or self._ready()
            if ok:
                return 200, text, b"ok\n"
            why = self._why_not()
            return 503, text, f"not serving{': ' + why if why else ''}\n".encode()
        if self._expected is not None:
            presented = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(presented, self._expected):
                return 401, [("WWW-Authenticate", "Bearer")], b"unauthorized\n"
        registry = self._registry
        names = parse_qs(url.query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)  # type: ignore[assignment]
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(registry)
        out = [("Content-Type", content_type)]
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body)
            out.append(("Content-Encoding", "gzip"))
        return 200, out, b"" if method == "HEAD" else body
