"""Dead letters always fit in one Kafka message, however large the record that failed."""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.codec import Codec
from pipeline.deadletter import dead_letter

NOW = datetime(2026, 11, 26, tzinfo=UTC)
KAFKA_MESSAGE_LIMIT = 1_048_576  # the producer's and the broker's default


def _letter(value: bytes, error: str = "bad") -> dict[str, object]:
    return dead_letter(
        topic="in",
        partition=2,
        offset=7,
        key=b"k" * 10,
        value=value,
        reason="bad_value",
        error=error,
        now=NOW,
    )


def test_a_record_that_fits_is_copied_whole() -> None:
    letter = _letter(b"x" * 999_990)  # 999,990 + a 10-byte key = the limit exactly
    assert letter["value"] == b"x" * 999_990 and letter["error"] == "bad"


def test_a_record_too_large_to_copy_is_named_by_its_position() -> None:
    letter = _letter(b"x" * 999_991, error="E" * 5000)
    assert letter["value"] is None
    assert letter["error"] == (
        "E" * 4000 + "... (5,000 characters in all) [the original 999,991 bytes are too large "
        "to copy here; they are at in[2]@7]"
    )
    assert (letter["event_id"], letter["key"]) == ("in:2:7", b"k" * 10)


def test_the_largest_dead_letter_fits_in_a_kafka_message() -> None:
    letter = _letter(b"x" * 999_990, error="\u00e9" * 10_000)  # 2 bytes a character in UTF-8
    assert len(Codec.load().encode("DeadLetter", letter)) < KAFKA_MESSAGE_LIMIT
