"""bench/recovery.py's pieces against the real broker: one probe lands on each source partition,
and the probes' own loop is left out of the numbers compared."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer

from bench.recovery import PROBE_LOOP, numbers, publish_probes
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import consume

pytestmark = pytest.mark.broker


async def _partitions_of(settings: Settings, topic: str, count: int) -> list[int]:
    consumer = AIOKafkaConsumer(
        settings.topic(topic),
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[int] = []
    try:
        async with asyncio.timeout(60):
            while len(found) < count:
                for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                    found.extend(tp.partition for _ in messages)
    finally:
        await consumer.stop()
    return found


def test_one_probe_lands_on_each_source_partition(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(partitions=4)
    asyncio.run(ensure_topics(settings))
    asyncio.run(publish_probes(settings, 1_795_000_000_000))
    assert sorted(asyncio.run(_partitions_of(settings, "resolutions", 4))) == [0, 1, 2, 3]
    probes = asyncio.run(consume(settings, "resolutions", 4))
    assert {r["loop"] for _, r in probes} == {PROBE_LOOP}
    assert {r["ts"].timestamp() for _, r in probes} == {1_795_000_000.0}


def test_the_compared_numbers_leave_the_probes_loop_out() -> None:
    samples = {
        ("loopline_coverage_ratio", frozenset({("loop", "refunds"), ("window", "1h")})): 0.5,
        ("loopline_coverage_ratio", frozenset({("loop", PROBE_LOOP), ("window", "1h")})): 1.0,
        ("loopline_events_total", frozenset({("topic", "x"), ("status", "ok")})): 9.0,
    }
    assert numbers(samples) == {"loopline_coverage_ratio{loop=refunds,window=1h}": 0.5}
