"""The server through tools that know nothing of it: Triton's perf_analyzer (load, unary and
streamed, with the server's own statistics) and a reflection-driven client (what grpcurl,
grpcui and Postman do: list, describe and call from the reflected descriptors alone)."""

from __future__ import annotations

import re
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor

from tests.conftest import ServerProcess, perf_analyzer

# --- perf_analyzer

_LEVEL = re.compile(
    r"Request concurrency: (\d+)\s+Client:\s+Request count: (\d+).*?"
    r"Server:\s+Inference count: (\d+)\s+Execution count: (\d+)\s+"
    r"Successful request count: (\d+)",
    re.S,
)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_runs_and_its_server_counts_match(
    server: ServerProcess, streaming: bool
) -> None:
    """perf_analyzer at concurrency 1 and 8, short windows: it must finish (it aborts on
    statistics whose compute counts differ) and the server must count what it sent."""
    binary = perf_analyzer()
    args = [
        binary, "-m", "mnist", "-i", "grpc", "-u", server.target,
        "--concurrency-range", "1:8:7", "--measurement-interval", "300",
        # stability is not what is tested (2 shared cores): 3 windows, whatever they measure
        "--stability-percentage", "1000", "--max-trials", "3",
        *(["--streaming"] if streaming else []),
    ]  # fmt: skip
    run = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    levels = _LEVEL.findall(run.stdout)
    assert [int(level[0]) for level in levels] == [1, 8], run.stdout[-3000:]
    for concurrency, client, images, executions, success in (map(int, lv) for lv in levels):
        assert client > 0
        # the server's figures are read before and after each window: requests in flight at
        # each of its two edges (at most the concurrency at each) may fall on the other side
        assert abs(success - client) <= 2 * concurrency, run.stdout[-3000:]
        # one image per request (batch size 1); images are counted at the model call, a
        # success at the answer, so a request between the two at an edge is in one only
        assert abs(images - success) <= 2 * concurrency, run.stdout[-3000:]
        assert 0 < executions <= images


# --- a reflection-driven client (grpcurl's view)


def _reflected(channel: grpc.Channel) -> descriptor_pool.DescriptorPool:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    return descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))


def _services(channel: grpc.Channel) -> list[str]:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    return list(ProtoReflectionDescriptorDatabase(channel).get_services())


def _call(channel: grpc.Channel, method: MethodDescriptor) -> grpc.StatusCode:
    """Call ``method`` with an empty request built from its reflected descriptor only; the
    answer must parse as its reflected response type. Returns the status."""
    request = message_factory.GetMessageClass(method.input_type)()
    response_type = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = (method.client_streaming, method.server_streaming)
    try:
        if kinds == (True, True):
            call = channel.stream_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            for answer in call(iter([request]), timeout=10):
                assert isinstance(answer, response_type)
            return grpc.StatusCode.OK
        if kinds == (False, True):  # e.g. Health/Watch, which never ends: its first answer
            watch = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            answers = watch(request, timeout=10)
            assert isinstance(next(answers), response_type)
            answers.cancel()
            return grpc.StatusCode.OK
        assert kinds == (False, False), path
        unary = channel.unary_unary(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        assert isinstance(unary(request, timeout=10), response_type)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        # served, so never gRPC's own "Method not found!"
        assert "Method not found" not in (err.details() or ""), path  # type: ignore[attr-defined]
        return err.code()  # type: ignore[attr-defined,no-any-return]


def test_reflection_lists_describes_and_calls_every_served_method(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        services = _services(channel)
        pool = _reflected(channel)
        assert set(services) >= {
            "mnist.v1.DigitClassifier", "inference.GRPCInferenceService",
            "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
            "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        }  # fmt: skip
        listed = {name: [m.name for m in pool.FindServiceByName(name).methods] for name in services}
        assert listed["inference.GRPCInferenceService"] == [
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
            "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
        ]  # fmt: skip
        assert listed["tensorflow.serving.ModelService"] == [
            "GetModelStatus", "HandleReloadConfigRequest",
        ]  # fmt: skip
        assert listed["tensorflow.serving.PredictionService"] == [
            "Classify", "Regress", "Predict", "MultiInference", "GetModelMetadata",
        ]  # fmt: skip
        codes = {}
        for name in services:
            if name == "grpc.reflection.v1alpha.ServerReflection":
                continue  # already in use above
            for method in pool.FindServiceByName(name).methods:
                codes[f"{name}/{method.name}"] = _call(channel, method)
    # an empty request: answered, or refused for what it lacks, never an unknown method
    assert codes["inference.GRPCInferenceService/ServerLive"] == grpc.StatusCode.OK
    assert codes["inference.GRPCInferenceService/ModelStreamInfer"] == grpc.StatusCode.OK
    assert codes["inference.GRPCInferenceService/ModelStatistics"] == grpc.StatusCode.OK
    assert codes["inference.GRPCInferenceService/ModelInfer"] == grpc.StatusCode.NOT_FOUND
    assert codes["tensorflow.serving.PredictionService/Classify"] == (grpc.StatusCode.UNIMPLEMENTED)
    assert codes["grpc.health.v1.Health/Check"] == grpc.StatusCode.OK
    # the repository: listing always, changing only with --model-control (off here)
    assert codes["inference.GRPCInferenceService/RepositoryIndex"] == grpc.StatusCode.OK
    assert codes["mnist.v1.DigitClassifier/ListModels"] == grpc.StatusCode.OK
    for changing in (
        "inference.GRPCInferenceService/RepositoryModelUnload",
        "tensorflow.serving.ModelService/HandleReloadConfigRequest",
        "mnist.v1.DigitClassifier/ConfigureModel",
    ):
        assert codes[changing] == grpc.StatusCode.FAILED_PRECONDITION, changing


def test_reflection_hides_nothing_that_is_served(server: ServerProcess) -> None:
    """Every method of Triton's and TF Serving's own service definitions that reflection does
    not list is really not served (gRPC's UNIMPLEMENTED "Method not found")."""
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_service_pb2")
    with grpc.insecure_channel(server.target) as channel:
        pool = _reflected(channel)
        for full in (
            triton.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            apis.DESCRIPTOR.services_by_name["PredictionService"],
        ):
            reflected = pool.FindServiceByName(full.full_name)
            listed = {m.name: m for m in reflected.methods}
            for method in full.methods:
                if method.name in listed:  # the same types as the real server's
                    mine = listed[method.name]
                    assert mine.input_type.full_name == method.input_type.full_name
                    assert mine.output_type.full_name == method.output_type.full_name
                    assert mine.client_streaming == method.client_streaming
                    continue
                path = f"/{full.full_name}/{method.name}"
                with pytest.raises(grpc.RpcError) as info:
                    if method.client_streaming:
                        list(channel.stream_stream(path)(iter([b""]), timeout=10))
                    else:
                        channel.unary_unary(path)(b"", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, path  # type: ignore[attr-defined]
                assert "Method not found" in info.value.details(), path  # type: ignore[attr-defined]
