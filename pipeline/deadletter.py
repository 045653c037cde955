"""Errors are data: a record that fails becomes a DeadLetter with its reason and original bytes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    error: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The DeadLetter record; its event_id is the source position, so a redelivery is one row."""
    return {
        "event_id": f"{topic}:{partition}:{offset}",
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key,
        "value": value,
        "reason": reason,
        "error": error,
        "ts": now or datetime.now(UTC),
    }


def dead_letter_of(message: Any, reason: str, error: str) -> dict[str, Any]:
    """The DeadLetter record of a consumed Kafka message (anything with topic, partition,
    offset, key and value)."""
    return dead_letter(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        reason=reason,
        error=error,
    )
