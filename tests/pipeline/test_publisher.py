"""The publisher SDK against the real broker: validated, keyed, all-or-nothing batches."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError

from pipeline.events import InputEvent, Outcome, ResolutionEvent, Resolver
from pipeline.kafka_local import LocalBroker
from pipeline.publisher import InvalidEvent, NotDelivered, Publisher, TopicMissing
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import consume, free_port

pytestmark = pytest.mark.broker
TS = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


async def _end_offsets(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        parts = [TopicPartition(settings.topic(topic), p) for p in range(settings.partitions)]
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


async def _inputs_of_at_most_200_bytes(settings: Settings) -> None:
    """Create the topics; the broker refuses inputs' messages larger than 200 bytes."""
    await ensure_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        limit = {"max.message.bytes": "200"}
        topic = ConfigResource(ConfigResourceType.TOPIC, settings.topic("inputs"), limit)
        await admin.alter_configs([topic])
    finally:
        await admin.close()
    await asyncio.sleep(1)  # the broker applies altered configs shortly after it answers


async def test_invalid_event_in_a_batch_sends_nothing(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    await ensure_topics(settings)
    good = {"event_id": "e1", "case_id": "c1", "loop": "refunds", "ts": TS, "source": "api"}
    bad = {**good, "event_id": "e2", "tokens": "many"}
    async with Publisher(settings) as publisher:
        with pytest.raises(InvalidEvent) as info:
            await publisher.publish_many("inputs", [good, good, bad])
        assert info.value.field == "tokens"
        assert info.value.index == 2
        assert "invalid inputs event (event #2 of the batch)" in str(info.value)
        assert publisher.sent == 0
    assert await _end_offsets(settings, "inputs") == 0


async def test_typed_events_are_keyed_by_case_id_and_flushed_on_close(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        await publisher.publish_input(
            InputEvent("e1", "case-1", "refunds", TS, "api", category="late", tokens=12)
        )
        await publisher.publish_resolution(
            ResolutionEvent(
                "e2",
                "case-1",
                "refunds",
                TS,
                Resolver.SYSTEM,
                Outcome.RESOLVED,
                "r1",
                model_cost_usd=0.02,
            )
        )
    ((key_in, rec_in),) = await consume(settings, "inputs", 1)
    ((key_res, rec_res),) = await consume(settings, "resolutions", 1)
    assert key_in == key_res == b"case-1"
    assert rec_in["category"] == "late" and rec_in["tokens"] == 12 and rec_in["ts"] == TS
    assert rec_res["resolver"] == "SYSTEM" and rec_res["model_cost_usd"] == 0.02


async def test_unknown_topic_and_unstarted_publisher_are_clear_errors(
    make_settings: Callable[..., Settings],
) -> None:
    publisher = Publisher(make_settings())
    with pytest.raises(ValueError, match="unknown topic 'outputs'"):
        publisher.encode("outputs", {})
    with pytest.raises(RuntimeError, match="not started"):
        await publisher.publish(
            "inputs", {"event_id": "e", "case_id": "c", "loop": "l", "ts": TS, "source": "s"}
        )


def test_a_publisher_that_cannot_connect_raises_and_leaves_no_client_open() -> None:
    """aiokafka warns of an unclosed producer when one is dropped after a failed start."""
    settings = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")  # nothing listens

    async def attempt() -> str:
        try:
            async with Publisher(settings):
                return "it started"
        except KafkaConnectionError as exc:
            return str(exc)  # not the exception: its traceback would keep the publisher

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(attempt()).startswith("KafkaConnectionError: Unable to bootstrap")
        gc.collect()
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []


async def test_a_send_to_a_topic_not_created_is_refused_with_the_remedy(
    make_settings: Callable[..., Settings],
) -> None:
    """The broker creates no topic on first use (nor should it: loopline's topics need their
    partitions and compaction), and the producer alone would wait 40 s and name no topic."""
    settings = make_settings()  # a topic prefix of its own: none of its topics exist yet
    event = {"event_id": "e1", "case_id": "c1", "loop": "refunds", "ts": TS, "source": "api"}
    async with Publisher(settings) as publisher:
        with pytest.raises(TopicMissing) as info:
            await publisher.publish_input(event)
    assert str(info.value) == (
        f"topic {settings.topic('inputs')} does not exist on {settings.bootstrap_servers}: "
        "create loopline's topics first (`loopline topics`)"
    )
    await ensure_topics(settings)
    async with Publisher(settings) as publisher:
        await publisher.publish_input(event)
    assert await _end_offsets(settings, "inputs") == 1


async def test_an_event_the_broker_refused_is_said_at_the_next_publish(
    make_settings: Callable[..., Settings],
) -> None:
    """A send the broker refuses fails after publish() returned. The publisher used to say so
    only once 20,000 sends were pending, or at flush: a caller publishing steadily (`loopline
    generate`) went on for minutes past the failure. Now the next publish raises."""
    settings = make_settings()
    await _inputs_of_at_most_200_bytes(settings)
    publisher = Publisher(settings, linger_ms=0)
    await publisher.start()
    try:
        large = InputEvent("e1", "case-1", "refunds", TS, "api", text="x" * 500)
        await publisher.publish_input(large)
        await asyncio.sleep(2)  # refused meanwhile
        with pytest.raises(NotDelivered, match=r"^1 event\(s\) were not delivered: "):
            await publisher.publish_input(InputEvent("e2", "case-2", "refunds", TS, "api"))
    finally:
        with pytest.raises(NotDelivered):
            await publisher.close()  # and said again at close, with everything not delivered
    assert await _end_offsets(settings, "inputs") == 0


async def test_publish_confirmed_waits_for_its_own_events_and_says_their_failure_once(
    make_settings: Callable[..., Settings],
) -> None:
    """The review page's way to publish a decision: it returns once Kafka has confirmed those
    events, and a refusal among them is raised there and nowhere else."""
    settings = make_settings()
    await _inputs_of_at_most_200_bytes(settings)
    small = InputEvent("e1", "case-1", "refunds", TS, "api")
    large = InputEvent("e2", "case-2", "refunds", TS, "api", text="x" * 500)
    resolution = ResolutionEvent(
        "e3", "case-1", "refunds", TS, Resolver.SYSTEM, Outcome.RESOLVED, "r1"
    )
    async with Publisher(settings, linger_ms=0) as publisher:
        with pytest.raises(InvalidEvent, match=r"event #1 of the batch"):
            await publisher.publish_confirmed([("inputs", small), ("inputs", {"loop": "x"})])
        assert publisher.sent == 0
        await publisher.publish_confirmed([("inputs", small), ("resolutions", resolution)])
        assert await _end_offsets(settings, "inputs") == 1  # confirmed: there already
        assert await _end_offsets(settings, "resolutions") == 1
        with pytest.raises(NotDelivered, match=r"^1 event\(s\) were not delivered: "):
            await publisher.publish_confirmed([("inputs", large), ("resolutions", resolution)])
        await publisher.publish_input(small)  # said once: neither here nor at close
    assert await _end_offsets(settings, "inputs") == 2
    assert await _end_offsets(settings, "resolutions") == 2


async def test_a_publisher_left_by_an_exception_gives_up_what_kafka_does_not_confirm(
    make_settings: Callable[..., Settings], own_broker: LocalBroker
) -> None:
    """The broker went down after the first send (its leaders known: aiokafka retries such
    sends without end) and the caller is going away (an exception, Ctrl-C): the publisher
    does not wait for the broker, and says how many events were not written."""
    settings = dataclasses.replace(make_settings(), bootstrap_servers=own_broker.bootstrap)
    await ensure_topics(settings)
    left = time.monotonic()
    with pytest.raises(NotDelivered, match=r"^3 event\(s\) were not delivered: ") as raised:
        async with Publisher(settings, linger_ms=0) as publisher:
            await publisher.publish_input(InputEvent("e0", "case-0", "refunds", TS, "api"))
            await publisher.flush()
            await asyncio.to_thread(own_broker.down)
            for n in range(1, 4):
                await publisher.publish_input(InputEvent(f"e{n}", f"case-{n}", "refunds", TS, "x"))
            left = time.monotonic()
            raise RuntimeError("the caller's own failure")
    waited = time.monotonic() - left
    assert Publisher.GIVE_UP_SECONDS <= waited < Publisher.GIVE_UP_SECONDS + 10, waited
    assert isinstance(raised.value.__context__, RuntimeError)  # the caller's, kept
