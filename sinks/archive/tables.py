"""The archive's tables (DESIGN.md), derived from the Avro schemas so that they evolve with them.

Each contract topic lands in one table whose columns are the record's fields (Avro type ->
DuckDB and Arrow type), keyed by the record's id so that writes are idempotent. Metric
snapshots are the exception: one snapshot record becomes one row per number, in the long
table metric_snapshots(ts, loop, window, metric, value, labels).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.codec import Codec


@dataclass(frozen=True)
class Column:
    name: str
    sql: str
    arrow: pa.DataType


@dataclass(frozen=True)
class Table:
    """One archive table: its columns, primary key, and how a record becomes rows."""

    name: str
    topic: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    replace: bool = False  # True: a newer record with the same key replaces the row
    rows: Callable[[Mapping[str, Any]], Iterator[dict[str, Any]]] | None = None
    #: ``rows`` for many records at once (an Arrow table of the record's fields); tables with
    #: ``rows`` but no ``batch_rows`` take their records one by one
    batch_rows: Callable[[pa.Table], pa.Table] | None = None

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.name, c.arrow) for c in self.columns])

    def ddl(self) -> str:
        columns = ", ".join(f'"{c.name}" {c.sql}' for c in self.columns)
        key = ", ".join(f'"{k}"' for k in self.key)
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({columns}, PRIMARY KEY ({key}))"

    def rows_of(self, record: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        if self.rows is not None:
            yield from self.rows(record)
        else:
            yield dict(record)

    @property
    def columnar(self) -> bool:
        """True when decoded records can arrive as an Arrow table (``rows_of_batch``)."""
        return self.rows is None or self.batch_rows is not None

    def rows_of_batch(self, records: pa.Table) -> pa.Table:
        return records if self.batch_rows is None else self.batch_rows(records)


_TIMESTAMP = Column("", "TIMESTAMPTZ", pa.timestamp("ms", tz="UTC"))
_PRIMITIVES: dict[str, tuple[str, pa.DataType]] = {
    "string": ("VARCHAR", pa.string()),
    "enum": ("VARCHAR", pa.string()),
    "long": ("BIGINT", pa.int64()),
    "int": ("INTEGER", pa.int32()),
    "double": ("DOUBLE", pa.float64()),
    "float": ("FLOAT", pa.float32()),
    "boolean": ("BOOLEAN", pa.bool_()),
    "bytes": ("BLOB", pa.binary()),
}


def _column_type(avro: Any) -> tuple[str, pa.DataType]:
    if isinstance(avro, list):  # a nullable union: ["null", T]
        (inner,) = [t for t in avro if t != "null"]
        return _column_type(inner)
    if isinstance(avro, str):
        return _PRIMITIVES[avro]
    kind = avro["type"]
    if avro.get("logicalType") == "timestamp-millis":
        return _TIMESTAMP.sql, _TIMESTAMP.arrow
    if kind == "map":
        sql, arrow = _column_type(avro["values"])
        return f"MAP(VARCHAR, {sql})", pa.map_(pa.string(), arrow)
    if kind == "array":
        sql, arrow = _column_type(avro["items"])
        return f"{sql}[]", pa.list_(arrow)
    return _PRIMITIVES[kind]


def columns_of(schema: Mapping[str, Any]) -> tuple[Column, ...]:
    """The archive columns of an Avro record schema, one per field, in field order."""
    return tuple(Column(f["name"], *_column_type(f["type"])) for f in schema["fields"])


METRIC_COLUMNS = (
    Column("ts", "TIMESTAMPTZ", pa.timestamp("ms", tz="UTC")),
    Column("loop", "VARCHAR", pa.string()),
    Column("window", "VARCHAR", pa.string()),
    Column("metric", "VARCHAR", pa.string()),
    Column("value", "DOUBLE", pa.float64()),
    Column("labels", "VARCHAR", pa.string()),
    Column("producer", "VARCHAR", pa.string()),
)


def _leaves(prefix: str, labels: dict[str, str], label: str | None, value: Any) -> Iterator[Any]:
    """(metric, labels, value) for every number under a snapshot object."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if label is None:  # the metric name itself, e.g. "quality"
                yield from _leaves(key, labels, _LABEL_OF.get(key), inner)
            else:
                yield from _leaves(prefix, {**labels, label: key}, None, inner)
    elif isinstance(value, bool):
        yield prefix, labels, float(value)
    elif isinstance(value, int | float) or value is None:
        yield prefix, labels, None if value is None else float(value)


_LABEL_OF = {"quality": "suite", "latency_seconds": "quantile", "features": "feature"}


def metric_rows(record: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """One row per number of a MetricSnapshot: every window's numbers and their week-over-week
    deltas (metric ``<name>_wow_delta``), unresolved_cases, and the drift scores."""
    base = {"ts": record["ts"], "loop": record["loop"], "producer": record["producer"]}

    def row(
        window: str, metric: str, labels: dict[str, str], value: float | None
    ) -> dict[str, Any]:
        text = json.dumps(labels, sort_keys=True, separators=(",", ":"))
        return {**base, "window": window, "metric": metric, "value": value, "labels": text}

    for window, numbers in json.loads(record["windows_json"]).items():
        for name, inner in numbers.items():
            if name == "wow_delta":
                for metric, labels, value in _leaves("", {}, None, inner):
                    yield row(window, f"{metric}_wow_delta", labels, value)
            else:
                for metric, labels, value in _leaves("", {}, None, {name: inner}):
                    yield row(window, metric, labels, value)
    yield row("", "unresolved_cases", {}, float(record.get("unresolved_cases") or 0))
    if record.get("drift_json"):
        drift = json.loads(record["drift_json"])
        yield row("", "drift_detected", {}, float(bool(drift.get("detected"))))
        for feature, methods in (drift.get("features") or {}).items():
            for method, score in methods.items():
                if method == "drifted":
                    yield row("", "drift_feature_drifted", {"feature": feature}, float(score))
                else:
                    labels = {"feature": feature, "method": method}
                    yield row("", "drift_score", labels, score)


#: Resolutions also keep the hourly rate that priced their human minutes when archived.
HOURLY_RATE = Column("hourly_rate_usd", "DOUBLE", pa.float64())


def build_tables(codec: Codec, hourly_rates: Mapping[str, float] | None = None) -> dict[str, Table]:
    """Every archive table by its contract topic (logical name). ``hourly_rates`` price the
    human minutes of resolutions as they are archived (default 0.0, as in the workers)."""
    rates = dict(hourly_rates or {})

    def priced(record: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        yield {**record, HOURLY_RATE.name: rates.get(record["loop"], 0.0)}

    def priced_batch(records: pa.Table) -> pa.Table:
        loops = pa.array(list(rates), pa.string())
        known = pc.take(
            pa.array(list(rates.values()), pa.float64()),
            pc.index_in(records.column("loop"), value_set=loops),
        )
        return records.append_column(HOURLY_RATE.name, pc.fill_null(known, 0.0))

    def plain(name: str, topic: str, record: str, key: str, **kw: Any) -> Table:
        return Table(name, topic, columns_of(codec.schema(record)), (key,), **kw)

    resolutions = plain("resolutions", "resolutions", "ResolutionEvent", "event_id")
    tables = [
        plain("inputs", "inputs", "InputEvent", "event_id"),
        Table(
            "resolutions",
            "resolutions",
            (*resolutions.columns, HOURLY_RATE),
            ("event_id",),
            rows=priced,
            batch_rows=priced_batch,
        ),
        plain("eval_results", "eval-results", "EvalResult", "event_id"),
        plain("eval_cases", "eval-cases", "EvalCase", "eval_case_id", replace=True),
        plain("alerts", "alerts", "Alert", "event_id"),
        plain("eval_candidates", "eval-candidates", "EvalCandidate", "candidate_id"),
        plain("reviews", "reviews", "ReviewDecision", "event_id"),
        plain("dead_letters", "dlq", "DeadLetter", "event_id"),
        Table(
            "metric_snapshots",
            "metrics",
            METRIC_COLUMNS,
            ("ts", "loop", "window", "metric", "labels"),
            rows=metric_rows,
        ),
    ]
    return {t.topic: t for t in tables}
