"""Creating loopline's topics on the real broker, and the message limit of those carrying state."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.settings import Settings
from pipeline.topics import STATE_MESSAGE_BYTES, changelog_topic, ensure_topics

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
    names = [fresh.topic("partials"), fresh.topic("inputs"), fresh.topic("eval-cases")]
    assert asyncio.run(_own_configs(fresh, names)) == {
        fresh.topic("partials"): {"max.message.bytes": str(STATE_MESSAGE_BYTES)},
        fresh.topic("inputs"): {},
        fresh.topic("eval-cases"): {"cleanup.policy": "compact"},
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
