"""Decoding a batch of single-object Avro records at once, straight into Arrow (for the sinks,
and, as rows, for the workers' stage 1).

fastavro decodes one record at a time into dicts (~15 us for an InputEvent) and the archive then
builds Arrow from those dicts. polars-avro (Rust, Apache arrow-avro) decodes a whole batch into
Arrow columns an order of magnitude faster. The bodies of one writer schema are framed as one
block of an in-memory Avro object container file, and three guards keep the result exact:

1. Every row must start where its message starts. The first field of every loopline record is
   a string id, so row i's id, encoded, must be the first bytes of message i's body; a record
   with a byte too many or too few shifts every row after it and fails the check.
2. A sentinel record (built here from the schema, with a distinctive id) closes the block, so
   the last real record's end is checked by the same rule, and exactly N + 1 rows are read
   (arrow-avro does not return when bytes are left over after a block's last row, so nothing
   past the requested rows is ever asked for).
3. Every timestamp-millis must be a time the per-record codec can decode (years 1 to 9999,
   what a datetime holds): Arrow holds any long, and one event stamped in the year 3,000,000
   reached the workers as a number and failed the archive's whole batch in DuckDB.
4. Any failure sends the batch to the per-record codec, which names each bad record's error (a
   dead letter) and decodes the rest. Records of an older writer schema take that path too,
   since they need schema resolution.

One leniency remains: arrow-avro reads any branch number other than null's as the value of a
nullable union, where fastavro rejects an out-of-range branch. No conforming writer produces
one (it takes a damaged byte that leaves every length intact), so it is accepted as read.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat
from polars_avro._avro_rs import AvroSource  # pinned minor version: see pyproject.toml
from polars_avro._source import seekable_factory

from pipeline.arrowrows import to_rows
from pipeline.codec import HEADER_SIZE, MAGIC, Codec, CodecError
from pipeline.featurecolumns import InputColumns

log = logging.getLogger(__name__)

_SYNC = b"loopline-sync-16"
#: The sentinel's id: trailing bytes after the last real record would have to spell exactly
#: this to pass for the sentinel's start.
_SENTINEL_ID = "loopline:sentinel:c3f1e0a9b27d"


@dataclass
class DecodedBatch:
    """A batch's records: ``table`` holds the rows of the messages at ``table_index`` (in
    order); ``records`` those decoded one by one; ``errors`` those that cannot be decoded."""

    table: pa.Table | None = None
    table_index: list[int] = field(default_factory=list)
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    errors: list[tuple[int, CodecError]] = field(default_factory=list)


def _varint(value: int) -> bytes:
    """Avro's zig-zag variable-length encoding of a long."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value & ~0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    return _varint(len(data)) + data


def _empty(avro: Any) -> Any:
    """The simplest valid value of an Avro type (for the sentinel record)."""
    if isinstance(avro, list):
        return None if "null" in avro else _empty(avro[0])
    kind = avro if isinstance(avro, str) else avro["type"]
    return {
        "null": None,
        "boolean": False,
        "int": 0,
        "long": 0,
        "float": 0.0,
        "double": 0.0,
        "string": "",
        "bytes": b"",
        "map": {},
        "array": [],
    }.get(kind, avro["symbols"][0] if kind == "enum" else None)


class _Framing:
    """The container header and sentinel of one writer schema."""

    def __init__(self, raw: dict[str, Any]) -> None:
        header = io.BytesIO()
        header.write(b"Obj\x01")
        meta = {"avro.schema": json.dumps(raw).encode(), "avro.codec": b"null"}
        header.write(_varint(len(meta)))
        for key, value in meta.items():
            header.write(_string(key))
            header.write(_varint(len(value)) + value)
        header.write(_varint(0))
        header.write(_SYNC)
        self.header = header.getvalue()
        body = io.BytesIO()
        sentinel = {f["name"]: _empty(f["type"]) for f in raw["fields"]}
        sentinel[raw["fields"][0]["name"]] = _SENTINEL_ID
        fastavro.schemaless_writer(body, fastavro.parse_schema(raw, named_schemas={}), sentinel)
        self.sentinel = body.getvalue()

    def container(self, bodies: Sequence[bytes]) -> bytes:
        data = b"".join([*bodies, self.sentinel])
        count, size = _varint(len(bodies) + 1), _varint(len(data))
        return b"".join((self.header, count, size, data, _SYNC))


class ArrowDecoder:
    """Decodes batches of one record type's messages into Arrow, falling back per record."""

    def __init__(self, codec: Codec, light_inputs: bool = False) -> None:
        self.codec = codec
        # Rows of InputEvent tables as pipeline.featurecolumns' light rows (stage 1's): their
        # features stay in Arrow until the core adds them to their buckets a batch at once.
        self.light_inputs = light_inputs
        self._framing: dict[str, _Framing] = {}
        for name in codec.names:
            raw = codec.schema(name)
            if raw["fields"] and raw["fields"][0]["type"] == "string":
                self._framing[name] = _Framing(raw)

    def decode(self, expected: str, values: Sequence[bytes | None]) -> DecodedBatch:
        """Decode messages that should all hold ``expected`` records (their topic's type)."""
        batch = DecodedBatch()
        framing = self._framing.get(expected)
        current = self.codec.fingerprint(expected)
        bodies: list[bytes] = []
        for index, value in enumerate(values):
            if (
                framing is not None
                and value is not None
                and value[:2] == MAGIC
                and value[2:HEADER_SIZE] == current
            ):
                batch.table_index.append(index)
                bodies.append(value[HEADER_SIZE:])
                continue
            self._decode_one(batch, index, value, expected)
        if bodies and framing is not None:
            table = _read(framing, bodies)
            if table is None:  # some record is bad: name it, decode the rest one by one
                for index in batch.table_index:
                    self._decode_one(batch, index, values[index], expected)
                batch.table_index = []
                batch.records.sort(key=lambda item: item[0])
                batch.errors.sort(key=lambda item: item[0])
            else:
                batch.table = table
        return batch

    def rows(
        self, expected: str, values: Sequence[bytes | None]
    ) -> list[dict[str, Any] | CodecError]:
        """Per value, in order: its record as ``to_rows`` reads it (the codec's, when it went
        one by one) or the CodecError it fails with. Should reading the table's rows fail, the
        batch is decoded one by one instead, so that no batch can stop a worker."""
        batch = self.decode(expected, values)
        out: list[Any] = [None] * len(values)  # each index is set below: a row, record or error
        if batch.table is not None:
            try:
                if self.light_inputs and expected == "InputEvent":
                    rows = InputColumns(batch.table).light_rows()
                else:
                    rows = to_rows(batch.table)
            except Exception:  # none is known; the codec still decodes every record
                log.exception("reading %s rows from Arrow failed; decoding one by one", expected)
                for index in batch.table_index:
                    self._decode_one(batch, index, values[index], expected)
            else:
                for index, row in zip(batch.table_index, rows, strict=True):
                    out[index] = row
        for index, record in batch.records:
            out[index] = record
        for index, error in batch.errors:
            out[index] = error
        return out

    def mixed_rows(
        self, expected: Sequence[str | None], values: Sequence[bytes | None]
    ) -> list[dict[str, Any] | CodecError | None]:
        """``rows`` for values of several record types, ``expected[i]`` the type of
        ``values[i]`` (None: not to decode, left None): each type's values at once, in order."""
        out: list[Any] = [None] * len(values)
        by_type: dict[str, list[int]] = {}
        for index, name in enumerate(expected):
            if name is not None:
                by_type.setdefault(name, []).append(index)
        for name, indices in by_type.items():
            decoded = self.rows(name, [values[i] for i in indices])
            for index, outcome in zip(indices, decoded, strict=True):
                out[index] = outcome
        return out

    def _decode_one(
        self, batch: DecodedBatch, index: int, value: bytes | None, expected: str
    ) -> None:
        try:
            batch.records.append((index, self.codec.decode(value, expected=expected).record))
        except CodecError as exc:
            batch.errors.append((index, exc))


def _read(framing: _Framing, bodies: list[bytes]) -> pa.Table | None:
    """The bodies as an Arrow table, or None unless every record decodes exactly."""
    expected_rows = len(bodies) + 1
    try:
        source = AvroSource([seekable_factory(io.BytesIO(framing.container(bodies)))], False, False)
        parts = source.batch_iter(expected_rows, None)
        chunk = pa.record_batch(next(parts))
    except Exception:  # arrow-avro's parse errors; the per-record path names the bad record
        return None
    if chunk.num_rows != expected_rows:
        return None
    ids = chunk.column(0).to_pylist()
    if ids[-1] != _SENTINEL_ID:
        return None
    for body, first in zip(bodies, ids, strict=False):
        if first is None or not body.startswith(_string(first)):
            return None
    records = chunk.slice(0, len(bodies))
    for column in records.columns:
        if pat.is_timestamp(column.type) and not _datetimes(column):
            return None
    return pa.Table.from_batches([records])


#: The epoch milliseconds a datetime holds, as fastavro decodes a timestamp-millis.
_FIRST_MS, _LAST_MS = -62_135_596_800_000, 253_402_300_799_999


def _datetimes(column: pa.Array) -> bool:
    """Whether every value of a timestamp column is one the per-record codec decodes."""
    low, high = pc.min_max(column.cast(pa.int64())).values()
    return not low.is_valid or (low.as_py() >= _FIRST_MS and high.as_py() <= _LAST_MS)
