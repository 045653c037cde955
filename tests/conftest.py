"""Fixture factories shared by the tests: a real local Kafka broker and worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.codec import Codec
from pipeline.demo import fetch_metrics
from pipeline.kafka_local import LocalBroker
from pipeline.metrics import parse_exposition, sample_sum
from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import ensure_topics, read_to_end

TEST_KAFKA_PORT = int(os.environ.get("TEST_KAFKA_PORT", "39092"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_broker_port() -> int:
    """A free port for a local broker whose next one, its controller's, is free too: picked
    below Linux's ephemeral range (32768-60999), where the outgoing connections of every test
    take theirs, so that none takes port + 1 while the broker starts."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20_000, 32_000)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError("no two adjacent free ports in 20000-32000")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


async def consume_messages(settings: Settings, topic: str, count: int) -> list[Any]:
    """At least ``count`` messages (aiokafka's ConsumerRecord: partition, key, raw value) of a
    loopline topic from the start (60 s at most)."""
    consumer = AIOKafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(60):
            while len(out) < count:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(messages)
    finally:
        await consumer.stop()
    return out


async def consume(
    settings: Settings, topic: str, count: int
) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Read at least ``count`` records of a loopline topic from the start (60 s at most)."""
    codec = Codec.load()
    return [
        (m.key, codec.decode(m.value).record)
        for m in await consume_messages(settings, topic, count)
    ]


async def read_topic(settings: Settings, topic: str) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Every record a loopline topic holds now, from its beginning to its current end."""
    codec = Codec.load()
    return [
        (key, codec.decode(value).record)
        for key, value in await read_to_end(settings, topic)
        if value is not None
    ]


async def delete_first_records(
    settings: Settings, topic: str, shares: dict[int, float], compacted: bool = True
) -> dict[int, int]:
    """Delete the first share of each given partition's records, as retention or
    kafka-delete-records.sh does (1.0 empties it: its start offset moves to its end); returns
    each partition's end offset. Kafka refuses to delete records of a topic that is only
    compacted, as the state's changelogs are, so such a topic's policy gets "delete" first, as
    an operator bounding its disk would give it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in shares}
        ends = await consumer.end_offsets(list(tps.values()))
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        if compacted:
            policy = {"cleanup.policy": "compact,delete"}
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, policy)])
        await admin.delete_records(
            {tp: RecordsToDelete(round(ends[tp] * shares[p])) for p, tp in tps.items()}
        )
    finally:
        await admin.close()
    return {p: ends[tp] for p, tp in tps.items()}


async def create_topics(settings: Settings, partitions: dict[str, int]) -> None:
    """Topics of the tests' own (names without the settings' prefix), by partition count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(settings.topic(name), count, 1) for name, count in partitions.items()]
        )
    finally:
        await admin.close()


async def commit_offsets(
    settings: Settings, group: str, offsets: dict[TopicPartition, int]
) -> None:
    """Commit ``offsets`` for ``group`` (none of whose members may be running), as a crash
    after the group's last commit leaves them: behind what its members had read."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
        assert {tp: await consumer.committed(tp) for tp in offsets} == offsets
    finally:
        await consumer.stop()


async def publish_in_transactions(
    settings: Settings, parts: list[tuple[list[tuple[str, dict[str, Any]]], bool]]
) -> None:
    """Publish each part of events in a Kafka transaction of its own, committed or aborted, as
    a service with exactly-once output does (its aborted records stay in the log)."""
    await ensure_topics(settings)
    encoder = Publisher(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, transactional_id="a-service"
    )
    await producer.start()
    try:
        for events, commit in parts:
            await producer.begin_transaction()
            for topic, record in events:
                key, value = encoder.encode(topic, record)
                await producer.send(settings.topic(topic), value=value, key=key)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The real broker: started here, empty, and stopped after, unless it is already up."""
    broker = LocalBroker(Settings.from_env().kafka_home, TEST_KAFKA_PORT)
    was_running = broker.status().running
    if not was_running:
        broker.wipe()  # every test makes its own topics; old runs' would only pile up
    broker.up(echo=lambda line: print(line, file=sys.stderr))
    yield broker.bootstrap
    if not was_running:
        broker.down()


@pytest.fixture
def own_broker() -> Iterator[LocalBroker]:
    """A broker of the test's own, which it may stop and start without the other tests'."""
    broker = LocalBroker(Settings.from_env().kafka_home, free_broker_port())
    broker.up(echo=lambda line: print(line, file=sys.stderr))
    yield broker
    broker.down()
    shutil.rmtree(broker.instance_dir, ignore_errors=True)


@pytest.fixture
def make_settings(kafka_bootstrap: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings isolated per test: own topic prefix, consumer group and data folder."""
    tag = uuid.uuid4().hex[:10]

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "bootstrap_servers": kafka_bootstrap,
            "topic_prefix": f"t{tag}.",
            "app_id": f"loopline-{tag}",
            "data_dir": tmp_path / "data",
            "web_port": free_port(),
            "archive_metrics_port": free_port(),
            "snapshot_interval_seconds": 1.0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "LOOPLINE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "LOOPLINE_TOPIC_PREFIX": settings.topic_prefix,
            "LOOPLINE_APP_ID": settings.app_id,
            "LOOPLINE_DATA_DIR": str(settings.data_dir),
            "LOOPLINE_WEB_PORT": str(settings.web_port),
            "LOOPLINE_PARTITIONS": str(settings.partitions),
            "LOOPLINE_SNAPSHOT_INTERVAL_SECONDS": str(settings.snapshot_interval_seconds),
            "LOOPLINE_ALLOWED_LATENESS_SECONDS": str(settings.allowed_lateness_seconds),
            "LOOPLINE_SLA_SECONDS": str(settings.sla_seconds),
            "LOOPLINE_MAX_CASES_PER_PARTITION": str(settings.max_cases_per_partition),
            "LOOPLINE_FAULT_STALL_AT_CHECK": str(settings.fault_stall_at_check),
            "LOOPLINE_FAULT_HANG_AT_CHECK": str(settings.fault_hang_at_check),
            "LOOPLINE_HOURLY_RATES": ",".join(f"{k}={v}" for k, v in settings.hourly_rates.items()),
            "LOOPLINE_ARCHIVE_PATH": str(settings.archive_file),
            "LOOPLINE_ARCHIVE_BATCH_ROWS": str(settings.archive_batch_rows),
            "LOOPLINE_ARCHIVE_BATCH_SECONDS": str(settings.archive_batch_seconds),
            "LOOPLINE_ARCHIVE_METRICS_PORT": str(settings.archive_metrics_port),
        }
    )
    if settings.rules is not None:
        env["LOOPLINE_RULES"] = str(settings.rules)
    if settings.instance_id is not None:
        env["LOOPLINE_INSTANCE_ID"] = settings.instance_id
    env["LOOPLINE_REVIEW_PORT"] = str(settings.review_port)
    if settings.security_protocol != "PLAINTEXT":
        env["LOOPLINE_SECURITY_PROTOCOL"] = settings.security_protocol
        env["LOOPLINE_SASL_MECHANISM"] = settings.sasl_mechanism
        env["LOOPLINE_SASL_USERNAME"] = settings.sasl_username or ""
        env["LOOPLINE_SASL_PASSWORD"] = settings.sasl_password or ""
        env["LOOPLINE_SSL_CAFILE"] = str(settings.ssl_cafile or "")
    if settings.review_token is not None:
        env["LOOPLINE_REVIEW_TOKEN"] = settings.review_token
    return env


@dataclass
class CliProcess:
    """A ``loopline <args>`` subprocess with the settings' environment, logging to a file."""

    settings: Settings
    log_path: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> CliProcess:
        self.launch()
        return self

    def launch(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", *self.args],
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process (unless it has exited) and return its exit status."""
        if not self.exited():
            self.proc.send_signal(sig)
            self.proc.wait(timeout=90)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@dataclass
class WorkerProcess(CliProcess):
    """A ``loopline worker`` subprocess and its /metrics."""

    args: tuple[str, ...] = ("worker",)

    def start(self) -> WorkerProcess:
        self.launch()
        wait_for(
            lambda: self.exited() or self.metrics_text() is not None,
            90,
            f"worker /metrics (log {self.log_path})",
        )
        assert not self.exited(), self.log_tail()
        return self

    def metrics_text(self) -> str | None:
        return fetch_metrics(f"http://127.0.0.1:{self.settings.web_port}/metrics")

    def probe(self, path: str) -> tuple[int, dict[str, Any]] | None:
        """GET /healthz or /readyz: the status and the JSON body; None if nothing answered."""
        url = f"http://127.0.0.1:{self.settings.web_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as refused:  # 503: not ready, with its reason
            return refused.code, json.loads(refused.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def metric(self, name: str, **labels: str) -> float:
        return sample_sum(parse_exposition(self.metrics_text() or ""), name, **labels)

    def processed(self, topic: str, status: str = "ok") -> int:
        return int(
            self.metric("loopline_events_total", topic=self.settings.topic(topic), status=status)
        )


Process = TypeVar("Process", bound=CliProcess)


def process_factory(
    tmp_path: Path, name: str, kind: Callable[[Settings, Path], Process], sig: int
) -> Iterator[Callable[[Settings], Process]]:
    """A fixture body: start processes of ``kind`` (each logging to tmp_path/<name>-N.log) and
    stop every one still running with ``sig`` at teardown, also those that failed to start;
    one that does not stop is killed, and the teardown fails naming it."""
    started: list[Process] = []

    def start(settings: Settings) -> Process:
        process = kind(settings, tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        process.start()
        return process

    yield start
    unstopped = []
    for process in started:  # every one, even after one that does not stop
        try:
            process.stop(sig)
        except subprocess.TimeoutExpired:
            process.proc.kill()  # not left running to load the tests after this one
            process.proc.wait(timeout=30)
            unstopped.append(process.log_path.name)
    assert not unstopped, f"did not stop on {signal.Signals(sig).name} within 90 s: {unstopped}"


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    yield from process_factory(tmp_path, "worker", WorkerProcess, signal.SIGKILL)
