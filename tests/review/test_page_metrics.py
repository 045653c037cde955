"""The review page's /metrics on the real broker: its backlog as Prometheus scrapes it."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import free_port
from tests.review.conftest import ReviewProcess
from tests.sinks.factories import candidate, review

pytestmark = pytest.mark.broker
TS = datetime(2026, 11, 29, 12, tzinfo=UTC)


async def _publish(settings: Settings) -> None:
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        await publisher.publish_many(
            "eval-candidates",
            [candidate("r1", TS), candidate("r2", TS), candidate("k1", TS, loop="kyc")],
        )
        await publisher.publish("reviews", review("r2", "DUPLICATE", TS))


def test_the_page_exports_its_backlog_per_loop_without_a_login(
    make_settings: Callable[..., Settings],
    start_review: Callable[[Settings], ReviewProcess],
) -> None:
    settings = make_settings(review_token="t0ken", review_port=free_port())
    published = time.time()
    asyncio.run(_publish(settings))
    page = start_review(settings)
    with urllib.request.urlopen(f"{page.url}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    scraped = time.time()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("loopline_review_")
    }
    waited = {
        loop: samples.pop(("loopline_review_oldest_open_age_seconds", (("loop", loop),)))
        for loop in ("kyc", "refunds")
    }
    assert samples == {
        ("loopline_review_open_candidates", (("loop", "kyc"),)): 1.0,
        ("loopline_review_open_candidates", (("loop", "refunds"),)): 1.0,  # r1; r2 decided
        ("loopline_review_decisions_total", (("decision", "DUPLICATE"), ("loop", "refunds"))): 1,
    }
    for loop, seconds in waited.items():  # since Kafka got the candidate, not its event time
        assert 0 <= seconds <= scraped - published + 1, (loop, seconds)
    assert "process_resident_memory_bytes" in text
