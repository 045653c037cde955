"""Errors are data: a record that fails becomes a DeadLetter with its reason and original bytes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

#: A dead letter must fit in one Kafka message (1 MiB by default) although it carries a whole
#: source message, which may itself be close to that size: beyond these sizes the original
#: bytes are left on the source topic (the dead letter says where) and the error is cut short.
VALUE_LIMIT_BYTES = 1_000_000
ERROR_LIMIT_CHARS = 4_000
#: The reasons a dead letter can give: the DeadLetter schema's list, and the archive sink's
#: ``bad_key`` (a tombstone whose key is not UTF-8).
REASONS = (
    "bad_header",
    "unknown_schema",
    "truncated",
    "bad_value",
    "invalid",
    "wrong_record",
    "future_ts",
    "too_many_events",
    "processing_error",
    "bad_key",
)


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
    if len(error) > ERROR_LIMIT_CHARS:
        error = f"{error[:ERROR_LIMIT_CHARS]}... ({len(error):,} characters in all)"
    if value is not None and len(value) + len(key or b"") > VALUE_LIMIT_BYTES:
        error += (
            f" [the original {len(value):,} bytes are too large to copy here; they are at "
            f"{topic}[{partition}]@{offset}]"
        )
        value = None
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
