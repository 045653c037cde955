"""A broker restart under traffic (an upgrade, a host reboot): the worker and the archive sink
wait it out, calmly, lose nothing and count nothing twice."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.throughput import cpu_seconds
from pipeline.kafka_local import LocalBroker
from pipeline.settings import Settings
from pipeline.worker import STOP_GRACE_SECONDS, UNSTOPPED_EXIT_CODE
from tests.agents.test_distributed import Events, _traffic, _wait_exact
from tests.agents.test_ingest import _publish
from tests.conftest import CliProcess, WorkerProcess, process_factory, wait_for
from tests.sinks.test_archive_sink import _events, _ids, _query, _wait_rows, archive_process

pytestmark = pytest.mark.broker


def _outage(broker: LocalBroker, process: CliProcess, seconds: float) -> tuple[float, int]:
    """Stop the broker for ``seconds`` and start it again: the CPU time and the log lines the
    process spent meanwhile."""
    broker.down()
    lines, cpu = len(process.log().splitlines()), cpu_seconds(process.proc.pid)
    time.sleep(seconds)
    lines, cpu = len(process.log().splitlines()) - lines, cpu_seconds(process.proc.pid) - cpu
    broker.up(echo=lambda line: print(line, file=sys.stderr))
    assert not process.exited(), process.log_tail()
    return cpu, lines


def _worker_midway(
    broker: LocalBroker,
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
    seed: int,
) -> tuple[Settings, Events, WorkerProcess]:
    """12,000 events of which the first 6,000 are published, and a worker counting them."""
    settings = make_settings(bootstrap_servers=broker.bootstrap)
    events = _traffic(seed, 12_000)
    asyncio.run(_publish(settings, events[:6000]))
    worker = start_worker(settings)
    wait_for(lambda: worker.processed("inputs") >= 1000, 120, "the worker to be midway")
    return settings, events, worker


def test_a_broker_restart_under_traffic_loses_nothing_and_counts_nothing_twice(
    own_broker: LocalBroker,
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    settings, events, worker = _worker_midway(own_broker, make_settings, start_worker, 41)
    cpu, lines = _outage(own_broker, worker, 20)  # longer than the session timeout (15 s)
    asyncio.run(_publish(settings, events[6000:]))
    _wait_exact(settings, events, [worker])
    # While the broker was away the worker waited, and said so in a few lines: aiokafka alone
    # retried its metadata without a pause, a core busy and over 100,000 lines in these 20 s
    # (pipeline.kafka_outage).
    assert cpu < 2.0, f"{cpu:.1f} s of CPU in a 20 s outage"
    assert lines < 100, "\n".join(worker.log().splitlines()[-lines:][:60])


def test_a_worker_asked_to_stop_while_the_broker_is_away_stops_and_loses_nothing(
    own_broker: LocalBroker,
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    """Faust's clean stop waits for the batch in hand, whose writes wait for the broker (up to
    Faust's 20 min producer timeout): it hung for as long as the broker was away. Now the
    process exits STOP_GRACE_SECONDS after it was asked to, as SIGKILL would stop it."""
    settings, events, worker = _worker_midway(own_broker, make_settings, start_worker, 43)
    own_broker.down()
    asked = time.monotonic()
    worker.stop(signal.SIGTERM)
    waited = time.monotonic() - asked
    assert worker.proc.returncode == UNSTOPPED_EXIT_CODE, worker.log_tail()
    assert STOP_GRACE_SECONDS <= waited < STOP_GRACE_SECONDS + 15, waited
    assert "the worker did not stop within 20 s (is the broker reachable?)" in worker.log()
    own_broker.up(echo=lambda line: print(line, file=sys.stderr))
    asyncio.run(_publish(settings, events[6000:]))
    _wait_exact(settings, events, [start_worker(settings)])


@pytest.fixture
def start_archive(tmp_path: Path) -> Iterator[Callable[[Settings], CliProcess]]:
    yield from process_factory(tmp_path, "archive", archive_process, signal.SIGKILL)


def test_the_archive_sink_waits_out_a_broker_restart_and_stops_while_it_is_away(
    own_broker: LocalBroker,
    make_settings: Callable[..., Settings],
    start_archive: Callable[[Settings], CliProcess],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        bootstrap_servers=own_broker.bootstrap,
        archive_path=tmp_path / "a.duckdb",
        archive_batch_rows=1500,
        archive_batch_seconds=0.5,
    )
    first, second, third = _events(4000), _events(2000, skip=4000), _events(1000, skip=6000)
    asyncio.run(_publish(settings, first))
    archive = start_archive(settings)
    _wait_rows(settings, {"inputs": len(_ids(first, "inputs"))}, archive)
    cpu, lines = _outage(own_broker, archive, 20)
    asyncio.run(_publish(settings, second))
    _wait_rows(settings, {"inputs": len(_ids(first + second, "inputs"))}, archive)
    assert cpu < 2.0, f"{cpu:.1f} s of CPU in a 20 s outage"
    assert lines < 100, "\n".join(archive.log().splitlines()[-lines:][:60])

    # Asked to stop while the broker is away, it stops cleanly (aiokafka's consumer raised its
    # own fetches' CancelledError out of stop(): a traceback and status 1, the producer left
    # open); restarted, it archives what came meanwhile, and each event once.
    own_broker.down()
    assert archive.stop() == 0, archive.log_tail()
    assert "Traceback" not in archive.log()
    assert "archive stopped:" in archive.log_tail(1)
    own_broker.up(echo=lambda line: print(line, file=sys.stderr))
    asyncio.run(_publish(settings, third))
    archive = start_archive(settings)
    every = first + second + third
    expected = {
        t.replace("-", "_"): len(_ids(every, t)) for t in ("inputs", "resolutions", "eval-results")
    }
    _wait_rows(settings, expected, archive)
    assert archive.stop() == 0, archive.log()[-2000:]
    for table, count in expected.items():
        assert _query(settings, f"SELECT count(*), count(DISTINCT event_id) FROM {table}") == [
            (count, count)
        ]
