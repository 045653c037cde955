"""The eval set as a stream: import eval cases into loopline.eval-cases, export them back out.

loopline.eval-cases is compacted and keyed by eval_case_id, so the topic is the eval set: the
latest record of each id. Import validates every row against the EvalCase schema and reports
each bad one with its line (JSON Lines) or row (Parquet) number, while the good rows are still
published; export reads the topic from its beginning to its current end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.codec import Codec, CodecError
from pipeline.core import record_ts_ms, to_ms
from pipeline.jsonlines import json_lines
from pipeline.publisher import Publisher
from pipeline.settings import Settings
from pipeline.topics import read_to_end

#: Defaults for columns an eval set file may leave out.
DEFAULTS: Mapping[str, Any] = {"suite": "CURRENT", "origin": "IMPORTED"}


@dataclass
class ImportReport:
    imported: int = 0
    rejected: list[str] = field(default_factory=list)  # "file:line: reason"


def _rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(position, row, None) of a JSON Lines or Parquet file, or (position, None, reason) for
    a row that cannot be read (a Parquet file that cannot be read at all is one such row)."""
    with path.open("rb") as head:
        magic = head.read(4)
    if magic == b"PAR1" or path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            yield str(path), None, f"not a readable Parquet file ({exc})"
            return
        for number, row in enumerate(rows, 1):
            yield f"{path}:row {number}", row, None
        return
    for number, row, error in json_lines(path):
        yield f"{path}:{number}", row, error


def normalise(row: Any, now_ms: int) -> dict[str, Any]:
    """An EvalCase record from a file row: defaults filled in, ts in epoch ms, Parquet maps
    (lists of pairs) made dicts. Raises ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    record = {**DEFAULTS, **{k: v for k, v in row.items() if v is not None}}
    for name in ("features", "attributes"):
        value = record.get(name, {})
        record[name] = dict(value) if isinstance(value, list) else value
    record["ts"] = now_ms if record.get("ts") is None else record_ts_ms(record["ts"])
    return record


def read_eval_cases(
    path: Path, codec: Codec, now_ms: int
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(position, record, None) for a valid row, (position, None, reason) for a bad one."""
    for where, row, error in _rows(path):
        if error is not None:
            yield where, None, error
            continue
        try:
            record = normalise(row, now_ms)
            codec.validate("EvalCase", record)
        except (CodecError, ValueError, TypeError) as exc:
            yield where, None, str(exc)
            continue
        yield where, record, None


async def import_eval_cases(
    settings: Settings, path: Path, progress: Callable[[str], None] | None = None
) -> ImportReport:
    codec = Codec.load()
    report = ImportReport()
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    async with Publisher(settings, codec) as publisher:
        for where, record, error in read_eval_cases(path, codec, now_ms):
            if record is None:
                report.rejected.append(f"{where}: {error}")
                if progress:
                    progress(f"rejected {where}: {error}")
                continue
            await publisher.publish("eval-cases", record)
            report.imported += 1
            if progress and report.imported % 10_000 == 0:
                progress(f"evalset import: {report.imported:,} eval cases sent")
    return report


def aged(cases: list[dict[str, Any]], now_ms: int, current_days: int) -> list[dict[str, Any]]:
    """The CURRENT eval cases older than ``current_days``, moved to the HISTORICAL suite: the
    regression suite grows as cases age out of the current one."""
    cutoff = now_ms - current_days * 86_400_000
    return [
        {**case, "suite": "HISTORICAL"}
        for case in cases
        if case["suite"] == "CURRENT" and _as_ms(case["ts"]) < cutoff
    ]


def _as_ms(value: Any) -> int:
    return to_ms(value) if isinstance(value, datetime) else int(value)


async def age_eval_set(settings: Settings, now_ms: int, current_days: int) -> int:
    """Publish the aged cases again (same id, suite HISTORICAL); returns how many."""
    moved = aged(await read_eval_set(settings), now_ms, current_days)
    async with Publisher(settings) as publisher:
        await publisher.publish_many("eval-cases", [{**c, "ts": _as_ms(c["ts"])} for c in moved])
    return len(moved)


async def delete_eval_cases(settings: Settings, ids: list[str]) -> tuple[list[str], list[str]]:
    """Publish a tombstone for every id that is in the eval set; returns (deleted, not
    found). The workers drop deleted cases from their baselines; the archive drops the rows."""
    present = {str(c["eval_case_id"]) for c in await read_eval_set(settings)}
    deleted = [i for i in dict.fromkeys(ids) if i in present]
    async with Publisher(settings) as publisher:
        for eval_case_id in deleted:
            await publisher.delete("eval-cases", eval_case_id)
    return deleted, [i for i in dict.fromkeys(ids) if i not in present]


async def read_eval_set(settings: Settings) -> list[dict[str, Any]]:
    """The eval set: the latest record of every eval_case_id on the topic, by loop and id."""
    codec = Codec.load()
    latest: dict[str, dict[str, Any] | None] = {}
    for key, value in await read_to_end(settings, "eval-cases"):
        if value is None:  # a tombstone removes the case
            if key is not None:
                latest[key.decode()] = None
            continue
        record = codec.decode(value, expected="EvalCase").record
        latest[str(record["eval_case_id"])] = record
    cases = [r for r in latest.values() if r is not None]
    return sorted(cases, key=lambda r: (str(r["loop"]), str(r["eval_case_id"])))


def write_eval_set(cases: list[dict[str, Any]], out: Any, parquet: bool) -> None:
    """JSON Lines (ts as ISO-8601) to a text stream, or Parquet to a path."""
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{**c, "ts": _as_datetime(c["ts"])} for c in cases]
        pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema(pa)), out)
        return
    for case in cases:
        ts = _as_datetime(case["ts"]).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out.write(json.dumps({**case, "ts": ts}, separators=(",", ":")) + "\n")


def _as_datetime(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromtimestamp(value / 1000, UTC)


def _parquet_schema(pa: Any) -> Any:
    text = pa.string()
    return pa.schema(
        [
            ("eval_case_id", text),
            ("loop", text),
            ("ts", pa.timestamp("ms", tz="UTC")),
            ("suite", text),
            ("origin", text),
            ("case_id", text),
            ("channel", text),
            ("category", text),
            ("language", text),
            ("features", pa.map_(text, pa.float64())),
            ("attributes", pa.map_(text, text)),
            ("text", text),
            ("embedding", pa.list_(pa.float32())),
            ("tokens", pa.int64()),
            ("expected", text),
            ("notes", text),
        ]
    )
