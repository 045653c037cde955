"""Creating loopline's topics on the real broker, and the message limit of those carrying state."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.settings import Settings
from pipeline.topics import (
    SOURCE_TOPICS,
    STATE_MESSAGE_BYTES,
    TOPICS,
    TopicLayoutError,
    changelog_topic,
    ensure_topics,
)
from tests.conftest import settings_env
from tests.pipeline.test_cli import loopline

pytestmark = pytest.mark.broker
_OWN = 1  # DescribeConfigs' config_source of a topic's own setting


async def _own_configs(settings: Settings, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        await admin.close()
    return {
        resource[3]: {e[0]: e[1] for e in resource[4] if e[3] == _OWN}
        for response in described
        for resource in response.resources
    }


async def _partition_counts(settings: Settings, source_topics: list[str]) -> dict[str, int]:
    """The partition count of each existing source topic, and of no other."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        sources = [settings.topic(t) for t in SOURCE_TOPICS if settings.topic(t) in existing]
        described = await admin.describe_topics(sources)
    finally:
        await admin.close()
    assert sorted(sources) == sorted(source_topics)
    return {t["topic"]: len(t["partitions"]) for t in described}


async def _create(settings: Settings, topics: list[NewTopic]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        response = await admin.create_topics(topics)
        assert all(code == 0 for _, code, *_ in response.topic_errors), response
        for _ in range(100):  # until the broker's metadata lists them
            if {t.name for t in topics} <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def test_topics_carrying_state_take_large_messages_new_or_existing(
    make_settings: Callable[..., Settings],
) -> None:
    fresh = make_settings()
    asyncio.run(ensure_topics(fresh))
    names = [fresh.topic(t) for t in ("partials", "inputs", "eval-cases", "reviews")]
    assert asyncio.run(_own_configs(fresh, names)) == {
        fresh.topic("partials"): {"max.message.bytes": str(STATE_MESSAGE_BYTES)},
        fresh.topic("inputs"): {},
        fresh.topic("eval-cases"): {"cleanup.policy": "compact"},
        fresh.topic("reviews"): {"retention.ms": "-1"},
    }

    # Made by an earlier version (and a changelog as Faust made it): raised, the rest kept.
    tag = uuid.uuid4().hex[:10]
    older = make_settings(topic_prefix=f"o{tag}.", app_id=f"loopline-o{tag}")
    changelog = changelog_topic(older, "loop-state")
    compacted = {"cleanup.policy": "compact", "segment.ms": "600000"}
    asyncio.run(
        _create(
            older,
            [NewTopic(older.topic("partials"), 1, 1), NewTopic(changelog, 1, 1, None, compacted)],
        )
    )
    ensured = asyncio.run(ensure_topics(older))
    assert older.topic("partials") not in ensured.created
    assert older.topic("inputs") in ensured.created
    assert ensured.raised == [older.topic("partials"), changelog]
    raised = f"max.message.bytes raised to {STATE_MESSAGE_BYTES} for {older.topic('partials')}"
    assert ensured.describe().endswith(f"; {raised}, {changelog}")
    limit = {"max.message.bytes": str(STATE_MESSAGE_BYTES)}

    def raised() -> bool:  # the broker applies altered configs shortly after it answers
        found = asyncio.run(_own_configs(older, [older.topic("partials"), changelog]))
        return found == {older.topic("partials"): limit, changelog: compacted | limit}

    for _ in range(50):
        if raised():
            break
        asyncio.run(asyncio.sleep(0.1))
    assert raised()


def _until_applied(settings: Settings, expected: dict[str, dict[str, str]]) -> None:
    """Wait for the broker to apply altered configs (shortly after it answers)."""
    for _ in range(50):
        if asyncio.run(_own_configs(settings, list(expected))) == expected:
            return
        time.sleep(0.1)
    assert asyncio.run(_own_configs(settings, list(expected))) == expected


def test_existing_topics_get_loopline_s_settings_unless_they_were_given_their_own(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A review decision deleted by retention while its candidate was still on
    eval-candidates made that candidate open again at the review page's next start, and an
    eval-cases topic made by hand without compaction deletes eval cases. Existing topics that
    go by the broker's default get loopline's setting, their other settings as they were; a
    setting the operator gave the topic is warned about and kept."""
    tag = uuid.uuid4().hex[:10]
    older = make_settings(topic_prefix=f"r{tag}.", app_id=f"loopline-r{tag}")
    reviews, eval_cases = older.topic("reviews"), older.topic("eval-cases")
    segment = {"segment.ms": "600000"}
    made = [NewTopic(reviews, 1, 1, None, segment), NewTopic(eval_cases, 4, 1)]
    asyncio.run(_create(older, made))
    assert asyncio.run(_own_configs(older, [reviews, eval_cases])) == {
        reviews: segment,
        eval_cases: {},
    }
    ensured = asyncio.run(ensure_topics(older))
    assert reviews not in ensured.created and eval_cases not in ensured.created
    assert ensured.mended == {
        eval_cases: {"cleanup.policy": "compact"},
        reviews: {"retention.ms": "-1"},
    }
    assert ensured.describe().endswith(
        f"; cleanup.policy=compact set on {eval_cases}; retention.ms=-1 set on {reviews}"
    )
    _until_applied(
        older,
        {reviews: segment | {"retention.ms": "-1"}, eval_cases: {"cleanup.policy": "compact"}},
    )
    assert asyncio.run(ensure_topics(older)).mended == {}  # once

    tag = uuid.uuid4().hex[:10]
    chosen = make_settings(topic_prefix=f"c{tag}.", app_id=f"loopline-c{tag}")
    reviews = chosen.topic("reviews")
    thirty_days = {"retention.ms": str(30 * 24 * 3_600_000)}
    asyncio.run(_create(chosen, [NewTopic(reviews, 1, 1, None, thirty_days)]))
    with caplog.at_level(logging.WARNING, logger="pipeline.topics"):
        ensured = asyncio.run(ensure_topics(chosen))
    assert ensured.mended == {}
    (warning,) = [r.getMessage() for r in caplog.records if reviews in r.getMessage()]
    assert warning == (
        f"topic {reviews} has its own retention.ms=2592000000 (30 days) where loopline makes "
        "it -1: a review decision deleted while its candidate is still on the candidates topic "
        "makes that candidate open again at the review page's next start. To mend: "
        f"kafka-configs.sh --alter --entity-type topics --entity-name {reviews} --add-config "
        "retention.ms=-1"
    )
    assert asyncio.run(_own_configs(chosen, [reviews])) == {reviews: thirty_days}


def test_source_topics_with_different_partition_counts_are_refused_with_the_reason(
    make_settings: Callable[..., Settings],
) -> None:
    """An operator who gives inputs more partitions than resolutions splits every case's input
    from its resolution: never joined, and no error said so. The worker now refuses to start."""
    settings = make_settings()  # 4 partitions
    inputs, resolutions = settings.topic("inputs"), settings.topic("resolutions")
    asyncio.run(_create(settings, [NewTopic(inputs, 6, 1), NewTopic(resolutions, 4, 1)]))
    with pytest.raises(TopicLayoutError) as refused:
        asyncio.run(ensure_topics(settings))
    listed = f"{inputs} 6, {resolutions} 4"  # refused before the other two were created
    assert str(refused.value).startswith(
        f"the source topics have different partition counts ({listed}): a case's events are "
        "joined within one partition, so each needs the same count."
    )
    worker = loopline("worker", env=settings_env(settings))
    assert worker.returncode == 1
    assert f"Error: the source topics have different partition counts ({listed})" in (worker.stderr)
    assert "Traceback" not in worker.stderr
    assert asyncio.run(_partition_counts(settings, [inputs, resolutions])) == {
        inputs: 6,
        resolutions: 4,
    }  # and no other source topic was made
    assert "loopline topics --partitions N" in worker.stderr  # how to mend it

    # Mended with one command: fewer than a topic has is refused before any change; then all
    # four get 6 (the missing two created with it), and the worker's check passes.
    env = settings_env(settings)
    fewer = loopline("topics", "--partitions", "5", env=env)
    assert fewer.returncode == 1
    assert fewer.stderr.strip().splitlines()[-1] == (
        f"Error: cannot give the source topics 5 partitions: they have more ({listed}), and "
        "Kafka cannot take partitions away"
    )
    mended = loopline("topics", "--partitions", "6", env=env)
    assert mended.returncode == 0, mended.stderr
    said = mended.stdout.splitlines()
    assert said[0].startswith(f"topics: partitions added to {resolutions} (4 -> 6); created ")
    assert said[1].endswith("; set LOOPLINE_PARTITIONS=6 where loopline runs")
    sources = [settings.topic(t) for t in SOURCE_TOPICS]
    assert asyncio.run(_partition_counts(settings, sources)) == dict.fromkeys(sources, 6)
    assert asyncio.run(ensure_topics(settings)).partitions == 6
    again = loopline("topics", "--partitions", "6", env=env)
    assert again.stdout == "topics: the source topics have 6 partitions; all exist\n"

    # The same count everywhere, other than LOOPLINE_PARTITIONS (made by hand, say): accepted.
    tag = uuid.uuid4().hex[:10]
    even = make_settings(topic_prefix=f"e{tag}.", app_id=f"loopline-e{tag}")
    asyncio.run(_create(even, [NewTopic(even.topic(t), 2, 1) for t in SOURCE_TOPICS]))
    assert even.topic("inputs") not in asyncio.run(ensure_topics(even)).created


def test_a_missing_source_topic_is_created_with_the_count_of_the_existing_ones(
    make_settings: Callable[..., Settings],
) -> None:
    """inputs was made by hand with 6 partitions and LOOPLINE_PARTITIONS says 4: the other
    source topics used to be created with 4, and then refused as not co-partitioned, leaving
    the operator topics to delete. Now they are created with 6."""
    settings = make_settings()  # 4 partitions
    asyncio.run(_create(settings, [NewTopic(settings.topic("inputs"), 6, 1)]))
    ensured = asyncio.run(ensure_topics(settings))
    assert ensured.partitions == 6
    sources = [settings.topic(t) for t in SOURCE_TOPICS]
    assert sorted(ensured.created) == sorted(
        [settings.topic(t.name) for t in TOPICS if t.name != "inputs"]
    )
    assert asyncio.run(_partition_counts(settings, sources)) == dict.fromkeys(sources, 6)
