"""`loopline kafka up|down|status` against a real broker of its own (not the shared one)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from pipeline import kafka_local
from pipeline.kafka_local import BrokerError, LocalBroker, new_cluster_id
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import free_broker_port


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "kafka", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


@pytest.mark.broker
def test_up_twice_status_down_status() -> None:
    port = free_broker_port()  # the controller takes port + 1
    home = Settings.from_env().kafka_home  # shares the jar cache; the instance is per port
    broker = LocalBroker(home, port)
    log = broker.log_path
    broker.instance_dir.mkdir(parents=True)
    broker.own(demo=True)  # as if a demo had made its data
    try:
        first = _cli("up", "--port", str(port))
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == (
            f"kafka is up at 127.0.0.1:{port} (pid {broker.status().pid}); log: {log}"
        )
        assert not broker.demo_marker.exists()  # started by hand: the next demo keeps its data
        # Up means up for consumer groups too: the first lookup of a group's coordinator on a
        # new broker answers "not available" until the offsets topic is made, which a consumer
        # would log as an ERROR.
        assert isinstance(asyncio.run(_coordinator(broker.bootstrap)), int)

        second = _cli("up", "--port", str(port))
        assert second.returncode == 0, second.stderr
        assert second.stdout.startswith(f"already up: kafka is up at 127.0.0.1:{port}")
        assert "starting kafka" not in second.stderr

        running = _cli("wipe", "--port", str(port))
        assert running.returncode == 1
        assert "is running; stop it before wiping" in running.stderr
        assert broker.has_data

        status = _cli("status", "--port", str(port))
        assert status.returncode == 0
        assert f"kafka is up at 127.0.0.1:{port}" in status.stdout
        assert str(log) in status.stdout

        down = _cli("down", "--port", str(port))
        assert down.returncode == 0
        assert down.stdout.strip() == f"kafka stopped (127.0.0.1:{port})"

        after = _cli("status", "--port", str(port))
        assert after.returncode == 3
        assert after.stdout.strip() == (
            f"kafka is down (would listen on 127.0.0.1:{port}); log: {log}"
        )

        again = _cli("down", "--port", str(port))
        assert again.stdout.strip() == f"kafka was not running (127.0.0.1:{port})"

        wiped = _cli("wipe", "--port", str(port))
        assert wiped.returncode == 0, wiped.stderr
        assert wiped.stdout.strip() == (
            f"kafka data deleted ({broker.instance_dir}); the next 'up' starts empty"
        )
        assert not broker.has_data
    finally:
        broker.down()
        shutil.rmtree(broker.instance_dir, ignore_errors=True)  # a port of its own: not reused


@pytest.mark.broker
def test_up_refuses_a_port_taken_by_another_process() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("up", "--port", str(port))
    assert result.returncode == 1
    assert f"port 127.0.0.1:{port} is in use by another process" in result.stderr


async def _coordinator(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.find_coordinator("a-first-group")
    finally:
        await admin.close()


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t for t in await admin.list_topics() if not t.startswith("__")}
    finally:
        await admin.close()


@pytest.mark.broker
def test_wipe_starts_the_next_broker_empty_and_refuses_a_running_one() -> None:
    broker = LocalBroker(Settings.from_env().kafka_home, free_broker_port())
    settings = Settings(bootstrap_servers=broker.bootstrap, topic_prefix="wiped.")
    try:
        broker.up(echo=lambda _: None)
        asyncio.run(ensure_topics(settings))
        assert settings.topic("inputs") in asyncio.run(_topics(broker.bootstrap))
        with pytest.raises(BrokerError, match="is running; stop it before wiping"):
            broker.wipe()
        broker.down()
        broker.wipe()
        broker.up(echo=lambda _: None)
        assert asyncio.run(_topics(broker.bootstrap)) == set()
    finally:
        broker.down()
        shutil.rmtree(broker.instance_dir, ignore_errors=True)


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage tool reads "-t -x..." as an option: one fresh broker in 64 failed to start."""
    draws = iter([uuid.UUID(bytes=b"\xfb" + bytes(15)), uuid.UUID(bytes=b"\x04" + bytes(15))])
    monkeypatch.setattr(kafka_local.uuid, "uuid4", lambda: next(draws))
    assert new_cluster_id() == "BAAAAAAAAAAAAAAAAAAAAA"
