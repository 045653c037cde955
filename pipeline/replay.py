"""Replay a file of events through the same processing code as the workers, with no broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro

from pipeline.codec import Codec, CodecError
from pipeline.core import record_ts_ms, resolution_amounts
from pipeline.jsonlines import json_lines
from pipeline.processor import Processor
from pipeline.progress import Meter
from pipeline.topics import RECORD_OF

TOPIC_OF = {record: topic for topic, record in RECORD_OF.items()}
REPLAYABLE = ("inputs", "resolutions", "eval-results", "eval-cases")


@dataclass
class ReplayReport:
    statuses: Counter[str] = field(default_factory=Counter)
    rejected: list[str] = field(default_factory=list)  # "file:line: reason"


@dataclass(frozen=True)
class Tombstone:
    """A line ``{"topic": "eval-cases", "key": ID, "record": null}``: the eval case is deleted,
    as a tombstone on the compacted topic deletes it for the workers."""

    key: str


def _jsonl(path: Path) -> Iterator[tuple[str, Any, str]]:
    for number, item, error in json_lines(path):
        where = f"{path}:{number}"
        if error is not None:
            yield "", None, f"{where}: {error}"
            continue
        if not isinstance(item, dict) or "topic" not in item or "record" not in item:
            yield "", None, f'{where}: expected {{"topic": ..., "record": {{...}}}}'
            continue
        if item["record"] is None:
            if isinstance(item.get("key"), str):
                yield str(item["topic"]), Tombstone(item["key"]), where
            else:
                yield "", None, f'{where}: a null record (a deletion) needs a "key"'
            continue
        yield str(item["topic"]), item["record"], where


def _avro(path: Path) -> Iterator[tuple[str, Any, str]]:
    """The records of an Avro container file; where it is damaged (truncated, a bad block),
    one rejection says from which record on it cannot be read, and the records before count."""
    number = 0
    with path.open("rb") as stream:
        try:
            reader = fastavro.reader(stream)
            schema: Any = reader.writer_schema
            topic = TOPIC_OF.get(str(schema["name"]).rsplit(".", 1)[-1], "")
            for number, record in enumerate(reader, 1):
                yield topic, record, f"{path}#{number}"
        except Exception as exc:  # fastavro's errors for damaged bytes are of many kinds
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            where = f"{path}#{number + 1}"
            yield "", None, f"{where}: the Avro file cannot be read from here on ({reason})"


def read_events(path: Path) -> Iterator[tuple[str, Any, str]]:
    """(topic, record, position) from JSON Lines, or from an Avro object container file."""
    with path.open("rb") as head:
        magic = head.read(4)
    return _avro(path) if magic == b"Obj\x01" else _jsonl(path)


def replay(
    paths: list[Path],
    processor: Processor,
    codec: Codec | None = None,
    reject: Callable[[str], None] | None = None,
    meter: Meter | None = None,
) -> ReplayReport:
    """Validate and process every event; a bad one is reported with its position, not fatal.
    ``meter`` counts each line read (rejected ones under "rejected") and says the progress."""
    codec = codec or Codec.load()
    report = ReplayReport()
    meter = meter or Meter("replay", None)

    def rejected(message: str, record: Any = None) -> None:
        """Report it, and count it as the workers count a dead letter (dead-letter rate)."""
        report.rejected.append(message)
        meter.add("rejected")
        if reject:
            reject(message)
        loop = record.get("loop") if isinstance(record, dict) else None
        processor.dead_letter(loop if isinstance(loop, str) else None, 1)

    for path in paths:
        for topic, record, where in read_events(path):
            if record is None:
                rejected(where)
                continue
            if topic not in REPLAYABLE:
                rejected(
                    f"{where}: unknown topic {topic!r}; one of {', '.join(REPLAYABLE)}", record
                )
                continue
            if isinstance(record, Tombstone):
                if topic != "eval-cases":
                    rejected(f"{where}: a null record (a deletion) is for eval-cases only")
                    continue
                report.statuses[processor.delete_eval_case(record.key)] += 1
                meter.add(topic)
                continue
            try:
                ts = record.get("ts")  # missing: the codec names the field
                normalised = dict(record) if ts is None else {**record, "ts": record_ts_ms(ts)}
                codec.validate(RECORD_OF[topic], normalised)
                if topic == "resolutions":
                    resolution_amounts(normalised)  # non-finite amounts are invalid
            except (CodecError, ValueError, TypeError, AttributeError) as exc:
                rejected(f"{where}: {exc}", record)
                continue
            report.statuses[processor.process(topic, normalised)] += 1
            meter.add(topic)
    return report
