"""The review queue's Kafka edge on the real broker: what it says of records Kafka deleted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.publisher import Publisher
from pipeline.review.feed import ReviewFeed
from pipeline.review.queue import ReviewQueue
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import delete_first_records
from tests.sinks.factories import candidate, review

pytestmark = pytest.mark.broker
TS = datetime(2026, 11, 29, 12, tzinfo=UTC)


async def test_candidates_kafka_deleted_are_counted_at_start_and_the_rest_queued(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Candidates go by their topic's retention: a page started after Kafka deleted some
    cannot queue them, and its log says how many (the archive keeps them)."""
    settings = make_settings()
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        await publisher.publish_many(
            "eval-candidates", [candidate(f"old{i}", TS + timedelta(seconds=i)) for i in range(6)]
        )
    topic = settings.topic("eval-candidates")
    everything = dict.fromkeys(range(settings.partitions), 1.0)
    ends = await delete_first_records(settings, topic, everything, compacted=False)
    assert sum(ends.values()) == 6
    later = TS + timedelta(hours=1)
    async with Publisher(settings) as publisher:
        await publisher.publish_many("eval-candidates", [candidate("new1", later)])
        await publisher.publish_many("eval-candidates", [candidate("new2", later)])
        await publisher.publish("reviews", review("new2", "REJECTED", later))

    queue = ReviewQueue()
    feed = ReviewFeed(settings, queue)
    with caplog.at_level(logging.INFO, logger="pipeline.review.feed"):
        await feed.start()
        try:
            await asyncio.wait_for(feed.ready.wait(), 60)
        finally:
            await feed.stop()
    assert sorted(queue.candidates) == ["new1"]  # new2's record went with its decision
    assert queue.decided == {"new2": "REJECTED"}
    said = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert said == [
        f"6 earlier candidate records of {topic} were deleted by Kafka (the topic's retention) "
        "before this start: those not decided are not in the queue (the archive keeps every "
        "candidate it read; a longer retention.ms on the topic keeps a longer backlog)"
    ]
