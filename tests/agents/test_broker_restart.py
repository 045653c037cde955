"""A broker restart under traffic (an upgrade, a host reboot): the worker rides it out, loses
nothing and counts nothing twice."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from pipeline.kafka_local import LocalBroker
from pipeline.settings import Settings
from tests.agents.test_distributed import _traffic, _wait_exact
from tests.agents.test_ingest import _publish
from tests.conftest import WorkerProcess, free_broker_port, wait_for

pytestmark = pytest.mark.broker


def _cpu_seconds(pid: int) -> float:
    """The CPU time a process has used so far (user and system, from /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def own_broker() -> Iterator[LocalBroker]:
    """A broker of this test's own, which it may stop and start without the other tests'."""
    broker = LocalBroker(Settings.from_env().kafka_home, free_broker_port())
    broker.up(echo=lambda line: print(line, file=sys.stderr))
    yield broker
    broker.down()
    shutil.rmtree(broker.instance_dir, ignore_errors=True)


def test_a_broker_restart_under_traffic_loses_nothing_and_counts_nothing_twice(
    own_broker: LocalBroker,
    make_settings: Callable[..., Settings],
    start_worker: Callable[[Settings], WorkerProcess],
) -> None:
    settings = make_settings(bootstrap_servers=own_broker.bootstrap)
    events = _traffic(41, 12_000)
    first, second = events[:6000], events[6000:]
    asyncio.run(_publish(settings, first))
    worker = start_worker(settings)
    wait_for(lambda: worker.processed("inputs") >= 1000, 120, "the worker to be midway")
    own_broker.down()
    lines, cpu = len(worker.log().splitlines()), _cpu_seconds(worker.proc.pid)
    time.sleep(20)  # longer than the session timeout (15 s)
    lines, cpu = len(worker.log().splitlines()) - lines, _cpu_seconds(worker.proc.pid) - cpu
    own_broker.up(echo=lambda line: print(line, file=sys.stderr))
    asyncio.run(_publish(settings, second))
    _wait_exact(settings, events, [worker])
    # While the broker was away the worker waited, and said so in a few lines: aiokafka alone
    # retried its metadata without a pause, a core busy and ~90,000 lines in these 20 s
    # (pipeline.kafka_outage).
    assert cpu < 2.0, f"{cpu:.1f} s of CPU in a 20 s outage"
    assert lines < 100, "\n".join(worker.log().splitlines()[-lines:][:60])
