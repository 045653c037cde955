"""bench/recovery.py's pieces against the real broker: one probe lands on each source partition,
and the probes' own loop is left out of the numbers compared."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bench.recovery import PROBE_LOOP, numbers, publish_probes
from pipeline.codec import Codec
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import consume_messages

pytestmark = pytest.mark.broker


def test_one_probe_lands_on_each_source_partition(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(partitions=4)
    asyncio.run(ensure_topics(settings))
    asyncio.run(publish_probes(settings, 1_795_000_000_000))
    messages = asyncio.run(consume_messages(settings, "resolutions", 4))
    assert sorted(m.partition for m in messages) == [0, 1, 2, 3]
    probes = [Codec.load().decode(m.value).record for m in messages]
    assert {r["loop"] for r in probes} == {PROBE_LOOP}
    assert {r["ts"].timestamp() for r in probes} == {1_795_000_000.0}


def test_the_compared_numbers_leave_the_probes_loop_out() -> None:
    samples = {
        ("loopline_coverage_ratio", frozenset({("loop", "refunds"), ("window", "1h")})): 0.5,
        ("loopline_coverage_ratio", frozenset({("loop", PROBE_LOOP), ("window", "1h")})): 1.0,
        ("loopline_events_total", frozenset({("topic", "x"), ("status", "ok")})): 9.0,
    }
    assert numbers(samples) == {"loopline_coverage_ratio{loop=refunds,window=1h}": 0.5}
