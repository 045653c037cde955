"""Raw topics (agents.raw): Faust hands the agents the bytes Kafka delivered."""

from __future__ import annotations

import asyncio

import faust
from faust.types import TP, Message

from agents.raw import RawSchema, raw_topic


def message(key: bytes | None, value: bytes | None) -> Message:
    return Message("t", 0, 7, 0.0, 0, [], key, value, None, tp=TP("t", 0))


def test_keys_and_values_are_the_delivered_bytes(app: faust.App) -> None:
    decode = RawSchema(key_serializer="raw", value_serializer="raw").compile(app)
    key, value = b"case-1", b"\xc3\x01\x02 not utf-8: \xff"
    event = asyncio.get_event_loop().run_until_complete(decode(message(key, value)))
    assert event.key is key and event.value is value
    tombstone = asyncio.get_event_loop().run_until_complete(decode(message(b"ec-1", None)))
    assert (tombstone.key, tombstone.value) == (b"ec-1", None)


def test_raw_topics_use_the_raw_schema(app: faust.App) -> None:
    topic = raw_topic(app, "a", "b")
    assert tuple(topic.topics) == ("a", "b")
    assert isinstance(topic.schema, RawSchema)
