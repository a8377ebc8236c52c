"""The metrics port: loopback by default, bearer token and TLS for scrapes, open probes that
answer however many silent connections are held, and a bounded wait for each request."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.settings import parse_settings
from tests.conftest import ServerProcess, start_server
from tests.test_security import _issue

TOKEN = "scrape-token-for-tests"


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


def test_metrics_bind_to_loopback_by_default() -> None:
    assert parse_settings(["--model-dir", "m"], environ={}).metrics_host == "127.0.0.1"


@pytest.fixture(scope="module")
def guarded(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ServerProcess, Path]:
    folder = tmp_path_factory.mktemp("metrics-tls")
    ca = _issue("metrics CA", None, ca=True)
    leaf = _issue("localhost", ca, server=True)
    (folder / "ca.pem").write_bytes(ca.cert)
    (folder / "cert.pem").write_bytes(leaf.cert)
    (folder / "key.pem").write_bytes(leaf.key)
    (folder / "token").write_text(TOKEN + "\n")
    srv = start_server(
        trained_model_dir, folder / "server.log",
        "--metrics-tls-cert", str(folder / "cert.pem"),
        "--metrics-tls-key", str(folder / "key.pem"),
        "--metrics-token-file", str(folder / "token"),
    )  # fmt: skip
    yield srv, folder / "ca.pem"  # type: ignore[misc]
    assert srv.stop() == 0


def test_scrapes_need_the_token_and_tls_and_probes_stay_open(
    guarded: tuple[ServerProcess, Path],
) -> None:
    srv, ca = guarded
    https = srv.metrics_url.replace("http://", "https://")
    tls = ssl.create_default_context(cafile=str(ca))
    assert _get(https, TOKEN, tls) == 200
    assert _get(https, None, tls) == 401
    assert _get(https, "wrong", tls) == 401
    assert _get(https.replace("/metrics", "/readyz"), None, tls) == 200  # probes: no token
    with pytest.raises(OSError):  # plaintext is not served (reset, or an error)
        _get(srv.metrics_url, TOKEN)
    with pytest.raises(OSError):  # nor to a client that does not trust the CA
        _get(https, TOKEN, ssl.create_default_context())


def test_probes_answer_while_300_half_open_connections_are_held(server: ServerProcess) -> None:
    host, port = server.metrics_url.split("//")[1].split("/")[0].split(":")
    ready = server.metrics_url.replace("/metrics", "/readyz")
    before = _threads(server.proc.pid)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(300)]
    try:
        # each probe while the 300 are held (the server closes a silent one after 5 s: a
        # closed one is opened again, as the attacker would)
        answers = []
        for _ in range(50):
            for i, sock in enumerate(idle):
                sock.setblocking(False)
                try:
                    closed = sock.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    sock.close()
                    idle[i] = socket.create_connection((host, int(port)), timeout=5)
            answers.append(_get(ready))
            time.sleep(0.05)
        assert answers == [200] * 50
        assert _threads(server.proc.pid) <= before + 2  # silent connections hold no thread
        assert _get(server.metrics_url) == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_connection_that_never_sends_a_request_is_closed_after_its_timeout(
    server: ServerProcess,
) -> None:
    host, port = server.metrics_url.split("//")[1].split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    try:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, not by us
        assert 4 <= time.monotonic() - started <= 12
    finally:
        sock.close()


def test_a_busy_metrics_port_is_named_in_the_error() -> None:
    from prometheus_client import CollectorRegistry

    from server.metrics_http import MetricsServer

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{port}: "):
            MetricsServer("127.0.0.1", port, CollectorRegistry(), ready=lambda: True)
    finally:
        taken.close()
