"""Several server processes on one port (``--workers N``): a supervisor and its workers.

One Python process serves about one core, whatever the machine has. With ``--workers N``
the supervisor starts N worker processes; each runs a complete server (its own batcher,
model and event loop) on the same gRPC port with ``SO_REUSEPORT``, so the kernel spreads
incoming connections across them. The supervisor itself never creates a gRPC object (gRPC's
state does not survive a fork; the workers are started with ``spawn`` anyway, as fresh
interpreters).

* Health: a worker listens on the port only once its model is loaded, so every connection
  reaches a worker that can serve it, and each worker answers health for itself. Each
  reports whether it serves into a shared array; the supervisor's ``/readyz`` and ready file
  say SERVING while any worker does: one worker's death (its connections reset, the others
  keep serving while it restarts) does not take the replica out of a balancer.
* Metrics: prometheus-client's multiprocess mode. Every process writes its values to files
  in one folder; the supervisor's metrics port serves their sum.
* A worker that dies is logged and restarted; the others keep serving meanwhile.
* SIGTERM / SIGINT: every worker drains as a single server does; the supervisor exits once
  they all have.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.sharedctypes
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.ready_file import write_ready_file
from server.settings import Settings, read_token
from server.worker_link import EXIT_CANNOT_START, WorkerLink

log = logging.getLogger(__name__)

RESTART_PAUSE_SECONDS = 1.0  # between a worker's death and its restart; doubles while it
MAX_RESTART_PAUSE_SECONDS = 30.0  # keeps dying before it serves, up to this


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) with SO_REUSEPORT: it fixes the port number that the
    workers bind again, for the supervisor's whole life (a restarted worker gets the same)."""
    address = host.strip("[]")  # gRPC's "[::]" is the socket module's "::"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _stop_while_starting(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _worker_main(settings: Settings, index: int, slots: Any, log_level: str) -> None:
    """A worker process: a complete server on the shared port (spawned, fresh interpreter)."""
    # A SIGTERM that comes while the worker still starts (importing, before ``run`` takes the
    # signal over) finds nothing to drain: exit 0, not killed by the signal (the supervisor
    # would count it a failure: a worker stopped right after its start, seen on a busy machine).
    signal.signal(signal.SIGTERM, _stop_while_starting)
    import asyncio

    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s worker{index} %(name)s: %(message)s",
    )
    from server.app import run

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM
    raise SystemExit(asyncio.run(run(settings, WorkerLink(index, slots))))


class Supervisor:
    """Starts, watches and stops the workers; serves their summed metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.n = settings.workers
        self._context = multiprocessing.get_context("spawn")
        self._slots = self._context.Array("b", self.n, lock=False)
        self._procs: list[Any] = [None] * self.n
        self._stopping = threading.Event()
        self._pause = [RESTART_PAUSE_SECONDS] * self.n  # before the next restart of each
        self._restart_at: list[float | None] = [None] * self.n  # when a dead one starts again
        self._served = [False] * self.n  # whether each has served since it started

    def _spawn(self, index: int, worker_settings: Settings) -> None:
        self._slots[index] = 0
        self._served[index] = False
        self._restart_at[index] = None
        proc = self._context.Process(
            target=_worker_main,
            args=(worker_settings, index, self._slots, self.settings.log_level.upper()),
            name=f"worker{index}",
            daemon=False,
        )
        proc.start()
        self._procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    def serve(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status (2: could not start)."""
        s = self.settings
        metrics_dir = Path(tempfile.mkdtemp(prefix="mnist-metrics-"))
        reserved: socket.socket | None = None
        endpoints: _Endpoints | None = None
        try:
            # before prometheus_client is imported anywhere: values go to files the port sums
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
            reserved = _reserve_port(s.host, s.port)
            port = reserved.getsockname()[1]
            worker_settings = dataclasses.replace(s, port=port, workers=1, ready_file=None)
            endpoints = _Endpoints(s, metrics_dir, port, self._any_serving)
        except (OSError, ValueError) as err:  # port taken, unreadable TLS or token file
            log.error("cannot start: %s", err)
            if reserved is not None:
                reserved.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            return EXIT_CANNOT_START
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        try:
            for index in range(self.n):
                self._spawn(index, worker_settings)
            endpoints.start(self._pids)
            log.info("supervising %d workers on %s:%d", self.n, s.host, port)
            while not self._stopping.wait(0.2):
                if not self._restart_dead(worker_settings, endpoints):
                    self._stop_workers(endpoints)
                    return EXIT_CANNOT_START
                endpoints.update(self._pids())
            return self._stop_workers(endpoints)
        finally:
            endpoints.close()
            reserved.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def _any_serving(self) -> bool:
        return any(self._slots[:])

    def _restart_dead(self, worker_settings: Settings, endpoints: _Endpoints) -> bool:
        """Restart workers that died (after a pause that grows while one keeps dying before
        it serves). False when one cannot start at all: its settings will not work."""
        now = time.monotonic()
        for index, proc in enumerate(self._procs):
            if proc is None:
                continue
            if proc.is_alive():
                if self._slots[index] and not self._served[index]:
                    self._served[index] = True
                    self._pause[index] = RESTART_PAUSE_SECONDS
                continue
            restart_at = self._restart_at[index]
            if restart_at is None:  # just found dead
                if proc.exitcode == EXIT_CANNOT_START:
                    log.error("worker %d cannot start (exit status %d); stopping",
                              index, EXIT_CANNOT_START)  # fmt: skip
                    return False
                pause = self._pause[index]
                log.error("worker %d (pid %d) died with exit status %s; restarting it in %.0fs",
                          index, proc.pid, proc.exitcode, pause)  # fmt: skip
                endpoints.worker_died(proc.pid)
                self._slots[index] = 0
                self._restart_at[index] = now + pause
                if not self._served[index]:
                    self._pause[index] = min(pause * 2, MAX_RESTART_PAUSE_SECONDS)
            elif now >= restart_at:
                self._spawn(index, worker_settings)
        return True

    def _stop_workers(self, endpoints: _Endpoints) -> int:
        log.info("stopping %d workers", self.n)
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        limit = time.monotonic() + self.settings.pre_stop_seconds + self.settings.grace_seconds
        status = 0
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(max(1.0, limit + 5 - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.join()
            status = status or (proc.exitcode or 0)
        endpoints.stopped()
        return status


class _Endpoints:
    """The supervisor's face: the metrics port (summed over workers) and the ready file."""

    def __init__(
        self,
        settings: Settings,
        metrics_dir: Path,
        grpc_port: int,
        any_serving: Callable[[], bool],
    ) -> None:
        # imported here: PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client loads
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from server.metrics_http import MetricsServer

        s = settings
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(metrics_dir))
        token = read_token(s.metrics_token_file)
        self._http = MetricsServer(
            s.metrics_host, s.metrics_port, registry, ready=any_serving, token=token,
            tls_cert=s.metrics_tls_cert, tls_key=s.metrics_tls_key,
        )  # fmt: skip
        self._metrics_dir = metrics_dir
        self._ready_file = s.ready_file
        self._grpc_port = grpc_port
        self._any_serving = any_serving
        self._written: tuple[bool, list[int]] | None = None

    def start(self, pids: Callable[[], list[int]]) -> None:
        self._http.start()
        self.update(pids())

    def update(self, pids: list[int]) -> None:
        """Rewrite the ready file when SERVING or the set of workers changed."""
        state = (bool(self._any_serving()), pids)
        if state != self._written:
            self._written = state
            self._write(serving=state[0], workers=pids)

    def worker_died(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self._metrics_dir))

    def stopped(self) -> None:
        self._write(serving=False, stopped=True)

    def _write(self, **facts: Any) -> None:
        if self._ready_file is not None:
            write_ready_file(self._ready_file, {
                "pid": os.getpid(), "grpc_port": self._grpc_port,
                "metrics_port": self._http.port, **facts,
            })  # fmt: skip

    def close(self) -> None:
        self._http.stop()
