"""docker-compose.yml as Docker Compose reads it (``docker-compose config`` needs no engine):
valid, and what it tells loopline's services is what loopline reads. A setting renamed in
pipeline/settings.py, a command renamed in the CLI or a port moved in one file only would
otherwise be found by the first user with Docker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from pipeline.cli import main
from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The services as Compose resolves them (anchors merged, paths made absolute)."""
    assert COMPOSE, "Debian's docker-compose package is needed; make test installs it"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    done = subprocess.run(
        [COMPOSE, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no warning either (unset variables, versions)
    found: dict[str, dict[str, Any]] = yaml.safe_load(done.stdout)["services"]
    return found


def loopline_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile (entrypoint ``loopline``)."""
    return {name: s for name, s in services.items() if "build" in s}


def dockerfile_env() -> dict[str, str]:
    """The ENV the image sets (one instruction, ``KEY=value`` pairs over continued lines)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for pair in line.split()[1:])


def test_every_part_of_the_stack_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {
        "kafka",
        "topics",
        "worker",
        "archive",
        "review",
        "prometheus",
        "alertmanager",
        "grafana",
        "generator",
    }
    assert set(loopline_services(services)) == {
        "topics",
        "worker",
        "archive",
        "review",
        "generator",
    }


def test_loopline_services_set_settings_loopline_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    image = dockerfile_env()
    assert Settings.unknown_variables(image) == []
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    internal = re.search(r"INTERNAL://([^,]+)", advertised)
    assert internal is not None, advertised
    for name, service in loopline_services(services).items():
        env = {**image, **{k: str(v) for k, v in service["environment"].items()}}
        assert Settings.unknown_variables(env) == [], name
        settings = Settings.from_env(env)  # every value is one loopline can use
        assert settings.bootstrap_servers == internal.group(1), name
        assert settings.web_host == "0.0.0.0", name  # reachable from Prometheus


def parse_command(args: list[str]) -> click.Command:
    """The ``loopline`` command these arguments run, its options parsed (click raises if not)."""
    command: click.Command = main
    rest = list(args)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    assert not isinstance(command, click.Group), args
    command.make_context(command.name, rest)
    return command


def test_loopline_services_run_commands_the_cli_has(services: dict[str, dict[str, Any]]) -> None:
    for service in loopline_services(services).values():
        parse_command(service["command"])


def test_monitoring_finds_the_workers_and_each_other(services: dict[str, dict[str, Any]]) -> None:
    worker_port = Settings.from_env(services["worker"]["environment"]).web_port
    assert [p["target"] for p in services["worker"]["ports"]] == [worker_port]
    archive = services["archive"]
    archive_port = Settings.from_env(archive["environment"]).archive_metrics_port
    assert [p["target"] for p in archive["ports"]] == [archive_port]
    review = services["review"]
    review_port = Settings.from_env(review["environment"]).review_port
    assert [p["target"] for p in review["ports"]] == [review_port]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job["dns_sd_configs"] for job in prometheus["scrape_configs"]}
    assert jobs == {  # the job names the rules' up{job=...} use
        "loopline": [
            {"names": ["worker"], "type": "A", "port": worker_port, "refresh_interval": "30s"}
        ],
        "loopline-archive": [
            {"names": ["archive"], "type": "A", "port": archive_port, "refresh_interval": "30s"}
        ],
        "loopline-review": [
            {"names": ["review"], "type": "A", "port": review_port, "refresh_interval": "30s"}
        ],
    }
    (alerting,) = prometheus["alerting"]["alertmanagers"]
    assert alerting["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert [p["target"] for p in services["alertmanager"]["ports"]] == [9093]
    datasources = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert [p["target"] for p in services["prometheus"]["ports"]] == [9090]


def test_every_mounted_folder_of_the_repository_exists(
    services: dict[str, dict[str, Any]],
) -> None:
    """Compose creates a missing bind-mounted folder empty: Prometheus would start without its
    config and rules, Grafana without its dashboard."""
    mounted = [
        Path(volume.split(":")[0])
        for service in services.values()
        for volume in service.get("volumes", [])
        if volume.startswith("/")
    ]
    assert len(mounted) == 4  # prometheus, alertmanager, and grafana's two
    for path in mounted:
        assert path.is_dir() and any(path.iterdir()), path


def test_the_worker_s_and_review_page_s_healthchecks_ask_their_own_web_port(
    services: dict[str, dict[str, Any]],
) -> None:
    # /healthz's answers are checked on a live worker (tests/agents/test_ingest.py) and page
    # (tests/review/conftest.py)
    for name in ("worker", "review"):
        command = services[name]["healthcheck"]["test"]
        assert command[:3] == ["CMD", "python", "-c"]
        (url,) = re.findall(r"'(http://[^']+)'", command[3])
        settings = Settings.from_env(services[name]["environment"])
        port = settings.web_port if name == "worker" else settings.review_port
        assert url == f"http://127.0.0.1:{port}/healthz", name
        compile(command[3], "healthcheck", "exec")  # the image's python can run it
