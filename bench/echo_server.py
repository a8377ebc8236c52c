"""Bare grpcio servers for ``mnist.v1.DigitClassifier/Predict`` with no model: the ceiling.

They parse the request and answer a fixed response of the same shape as the real server's,
so the benchmark measures what Python gRPC itself costs on this machine.

    python -m bench.echo_server --flavour aio --port 0 --ready-file ready.json
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import grpc.aio

from mnist_client.pb import digit_classifier_pb2 as pb
from mnist_client.pb import digit_classifier_pb2_grpc as pb_grpc
from server.ready_file import write_ready_file

_RESPONSE = pb.PredictResponse(digit=7, probabilities=[0.1] * 10, model_version=1)
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)]


class SyncEcho(pb_grpc.DigitClassifierServicer):
    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        if len(request.image) != 784:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad image")
        return _RESPONSE


class AsyncEcho(pb_grpc.DigitClassifierServicer):
    async def Predict(  # type: ignore[override]
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext
    ) -> pb.PredictResponse:
        if len(request.image) != 784:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad image")
        return _RESPONSE


def _ready(path: Path | None, port: int) -> None:
    print(f"listening on {port}", flush=True)
    if path is not None:
        write_ready_file(path, {"grpc_port": port, "serving": True})


def serve_sync(port: int, threads: int, ready_file: Path | None) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=_OPTIONS)
    pb_grpc.add_DigitClassifierServicer_to_server(SyncEcho(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    _ready(ready_file, bound)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


async def serve_aio(port: int, ready_file: Path | None) -> None:
    server = grpc.aio.server(options=_OPTIONS)
    pb_grpc.add_DigitClassifierServicer_to_server(AsyncEcho(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    _ready(ready_file, bound)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", choices=("sync", "aio"), required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=16, help="sync flavour's pool size")
    parser.add_argument("--ready-file", type=Path, help="write {grpc_port, serving} here")
    args = parser.parse_args()
    if args.flavour == "sync":
        serve_sync(args.port, args.threads, args.ready_file)
    else:
        asyncio.run(serve_aio(args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
