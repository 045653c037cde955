"""SASL over TLS: `loopline kafka up --secure` gives a SCRAM+TLS listener; the SDK and a worker
connect with the right credentials, and a worker with a wrong password stops with a clear error
that does not show the password. Its ACLs: a broker that refuses to raise a topic's message
limit gets a warning, not a stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka.admin import NewTopic

from pipeline.kafka_local import LocalBroker
from pipeline.settings import Settings
from pipeline.topics import STATE_MESSAGE_BYTES, ensure_topics
from tests.agents.test_ingest import _publish
from tests.conftest import TEST_KAFKA_PORT, WorkerProcess, free_port, settings_env, wait_for
from tests.pipeline.test_topics import _create, _own_configs

pytestmark = pytest.mark.broker
SECURE_PORT = TEST_KAFKA_PORT + 200  # its own broker: plain port, controller +1, SASL_SSL +2


@pytest.fixture(scope="module")
def secure_broker() -> Iterator[LocalBroker]:
    broker = LocalBroker(Settings.from_env().kafka_home, SECURE_PORT, secure=True)
    broker.down()  # a broker left on this port may predate --secure
    broker.up(echo=lambda line: print(line, file=sys.stderr))
    yield broker
    broker.down()


@pytest.fixture
def secure_settings(secure_broker: LocalBroker, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        base = Settings.from_env(secure_broker.secure_env())
        values: dict[str, object] = {
            "topic_prefix": "secure.",
            "app_id": f"loopline-secure-{free_port()}",
            "data_dir": tmp_path / "data",
            "web_port": free_port(),
            "snapshot_interval_seconds": 1.0,
        }
        return dataclasses.replace(base, **(values | overrides))  # type: ignore[arg-type]

    return make


def test_the_sdk_and_a_worker_connect_over_scram_and_tls(
    secure_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = secure_settings()
    assert settings.security_protocol == "SASL_SSL" and settings.ssl_cafile is not None
    assert settings.sasl_password is not None and settings.sasl_password not in repr(settings)
    ts = datetime(2026, 11, 25, 9, tzinfo=UTC)
    events = [
        (
            "inputs",
            {"event_id": f"i{i}", "case_id": f"c{i}", "loop": "refunds", "source": "t", "ts": ts},
        )
        for i in range(20)
    ]
    asyncio.run(_publish(settings, events))  # the SDK, over SASL_SSL
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        wait_for(lambda: worker.processed("inputs") == 20, 90, f"20 inputs ({worker.log_path})")
    finally:
        worker.stop()
    assert settings.sasl_password not in worker.log()


def test_a_wrong_password_stops_the_worker_with_a_clear_error(
    secure_settings: Callable[..., Settings],
) -> None:
    settings = secure_settings(sasl_password="not-the-password")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert f"cannot use Kafka at {settings.bootstrap_servers} (SASL_SSL as loopline)" in output
    assert "invalid credentials" in output
    assert "not-the-password" not in output


def test_a_limit_the_broker_refuses_to_raise_is_warned_about_and_the_rest_goes_on(
    secure_broker: LocalBroker,
    secure_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A partials topic made before with Kafka's default limit, and an ACL that denies the
    worker's user AlterConfigs on it: ensure_topics warns with the command that raises it,
    creates the other topics, raises nothing, and returns (the worker starts)."""
    settings = secure_settings(topic_prefix=f"refused{free_port()}.")
    plain = Settings.from_env({"LOOPLINE_BOOTSTRAP_SERVERS": secure_broker.bootstrap})
    plain = dataclasses.replace(plain, topic_prefix=settings.topic_prefix)
    partials = settings.topic("partials")
    asyncio.run(_create(plain, [NewTopic(partials, 1, 1)]))
    user = f"User:{settings.sasl_username}"
    for acl in (
        ("--allow-principal", user, "--operation", "All", "--topic", "*"),
        ("--deny-principal", user, "--operation", "AlterConfigs", "--topic", partials),
    ):
        done = secure_broker.tool("kafka.admin.AclCommand", "--add", *acl)
        assert done.returncode == 0, done.stdout + done.stderr

    with caplog.at_level(logging.WARNING, logger="pipeline.topics"):
        ensured = asyncio.run(ensure_topics(settings))
    assert ensured.raised == []
    assert settings.topic("inputs") in ensured.created and partials not in ensured.created
    (warning,) = [r.getMessage() for r in caplog.records if partials in r.getMessage()]
    assert warning.startswith(
        f"cannot raise max.message.bytes of topic {partials} from 1048588 to {STATE_MESSAGE_BYTES}"
    ), warning
    assert warning.endswith(
        f"set it with kafka-configs.sh --alter --entity-type topics --entity-name {partials} "
        f"--add-config max.message.bytes={STATE_MESSAGE_BYTES}"
    ), warning
    assert asyncio.run(_own_configs(plain, [partials])) == {partials: {}}  # as it was
