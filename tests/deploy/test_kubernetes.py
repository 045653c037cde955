"""deploy/kubernetes/loopline.yaml: valid against the Kubernetes API schemas, and what it tells
loopline (settings, commands, ports, probes) is what loopline reads and serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeline.settings import Settings
from pipeline.worker import STOP_GRACE_SECONDS
from tests.deploy.test_compose import parse_command

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "loopline.yaml"
KUBERNETES = "1.30.0"  # a version every maintained cluster serves the manifest's APIs in


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _container(resource: dict[str, Any]) -> dict[str, Any]:
    (container,) = resource["spec"]["template"]["spec"]["containers"]
    return container


def _settings_of(resources: dict[str, dict[str, Any]], container: dict[str, Any]) -> Settings:
    """The settings a container reads: the ConfigMap, then its own plain values (a value from a
    field or a secret stands in as its variable's name)."""
    env = dict(resources["ConfigMap/loopline-env"]["data"])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry["name"].lower())
    assert Settings.unknown_variables(env) == [], container["name"]
    return Settings.from_env(env)


def test_every_resource_is_valid_for_the_kubernetes_api(
    resources: dict[str, dict[str, Any]],
) -> None:
    assert set(resources) == {
        "ConfigMap/loopline-env",
        "Job/loopline-topics",
        "Service/loopline-worker",
        "StatefulSet/loopline-worker",
        "Service/loopline-archive",
        "StatefulSet/loopline-archive",
        "Deployment/loopline-review",
        "Service/loopline-review",
    }
    for name, resource in resources.items():
        try:
            kubernetes_validate.validate(resource, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name}: {exc.message} at {list(exc.path)}") from None


def test_each_container_runs_a_loopline_command_with_settings_it_reads(
    resources: dict[str, dict[str, Any]],
) -> None:
    commands = {}
    for name, resource in resources.items():
        if resource["kind"] in ("Job", "StatefulSet", "Deployment"):
            container = _container(resource)
            assert container["envFrom"] == [{"configMapRef": {"name": "loopline-env"}}], name
            _settings_of(resources, container)
            commands[name] = parse_command(container["args"]).name
    assert commands == {
        "Job/loopline-topics": "topics",
        "StatefulSet/loopline-worker": "worker",
        "StatefulSet/loopline-archive": "run",
        "Deployment/loopline-review": "review",
    }


def test_probes_and_services_use_the_ports_and_paths_loopline_serves(
    resources: dict[str, dict[str, Any]],
) -> None:
    worker_set = resources["StatefulSet/loopline-worker"]
    worker = _container(worker_set)
    settings = _settings_of(resources, worker)
    assert settings.web_host == "0.0.0.0"  # reachable from the kubelet and Prometheus
    assert worker["ports"] == [{"name": "metrics", "containerPort": settings.web_port}]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # static membership by pod name; a stop that cannot finish ends within the grace
    (instance,) = [e for e in worker["env"] if e["name"] == "LOOPLINE_INSTANCE_ID"]
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert worker_set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > (
        STOP_GRACE_SECONDS
    )
    archive = _container(resources["StatefulSet/loopline-archive"])
    archive_port = _settings_of(resources, archive).archive_metrics_port
    assert archive["ports"] == [{"name": "metrics", "containerPort": archive_port}]
    review = _container(resources["Deployment/loopline-review"])
    review_port = _settings_of(resources, review).review_port
    assert review["ports"] == [{"name": "http", "containerPort": review_port}]
    assert review["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert review["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for service, port in (("worker", settings.web_port), ("archive", archive_port)):
        spec = resources[f"Service/loopline-{service}"]["spec"]
        assert spec["clusterIP"] == "None"  # an A record per pod, as compose's DNS gives
        assert [p["port"] for p in spec["ports"]] == [port]
