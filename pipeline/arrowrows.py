"""Arrow tables as the rows stage 1's pure core reads (pipeline.partition): the codec's
values, except that a timestamp-millis is its epoch milliseconds (what the core computes with)
rather than a datetime."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pyarrow as pa
import pyarrow.types as pat


def to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The table's rows as dicts, column by column: Arrow's own row conversion makes a datetime
    per timestamp and a list of pairs per map, which together cost more than fastavro's
    decoding."""
    names = table.column_names
    columns = [column_values(table.column(name).combine_chunks()) for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def column_values(column: pa.Array) -> list[Any]:
    """One column's values as ``to_rows`` puts them in its rows."""
    kind = column.type
    if pat.is_timestamp(kind) and kind.unit == "ms":
        return column.cast(pa.int64()).to_pylist()  # type: ignore[no-any-return]
    if pat.is_dictionary(kind):  # an Avro enum
        return column.cast(pa.string()).to_pylist()  # type: ignore[no-any-return]
    if pat.is_map(kind):
        offsets = column.offsets.to_pylist()
        keys, items = column_values(column.keys), column_values(column.items)
        maps: list[Any] = [
            dict(zip(keys[start:end], items[start:end], strict=True))
            for start, end in pairwise(offsets)
        ]
        if column.null_count:
            valid = column.is_valid().to_pylist()
            maps = [m if ok else None for m, ok in zip(maps, valid, strict=True)]
        return maps
    return column.to_pylist()  # type: ignore[no-any-return]
