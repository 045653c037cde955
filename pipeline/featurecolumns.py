"""Input features added to their summaries a batch at a time, from the Arrow columns stage 1
decodes (pipeline.arrowcodec), instead of input by input from Python dicts.

Adding an input's features one by one (``FeatureStats.add_record``) and first turning its maps
and embedding into Python objects were about a quarter of a worker's time. Here a batch's inputs
stay in Arrow: the core (pipeline.partition) gets light rows (the fields it joins and counts
by, and a ``FEATURE_ROW`` handle), notes which bucket each input went to, and adds each
bucket's rows at once before anything reads the bucket.

The result is the summary ``add_record`` gives, exactly, not within a bound: counts are counted
per distinct value (the summaries' folds depend only on the union of the values, so adding a
value n times at once folds alike), each feature's values come in the order they first appear
(the features themselves may not, when an input lacks one that a later one has: nothing reads
their order, as merges across partitions change it anyway), and
embeddings are normalised by ``math.hypot`` as ``add_record`` does and summed one row after the
other (``np.add.accumulate``), so the float sums round alike. A batch whose maps hold a key
longer than CATEGORY_CHARS, or a key twice in one row (Avro allows it; the codec keeps the
last), is added row by row with ``add_record``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrowrows import column_values, to_rows
from pipeline.features import (
    ATTRIBUTES,
    CATEGORICAL,
    CATEGORY_CHARS,
    EMBEDDING_DIMS,
    NUMBERS,
    FeatureStats,
)

#: The key of a light input row that holds its (InputColumns, row) handle: no Avro field
#: name can start with "@".
FEATURE_ROW = "@features"
#: The fields of an input row that stage 1 reads besides its features.
LIGHT_FIELDS = ("event_id", "case_id", "loop", "ts", "source", "category")


class InputColumns:
    """One decoded batch of InputEvent records (an Arrow table of one chunk)."""

    __slots__ = ("_full", "table")

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()
        self._full: list[dict[str, Any]] | None = None

    def light_rows(self) -> list[dict[str, Any]]:
        """The rows with only LIGHT_FIELDS and the FEATURE_ROW handle."""
        table = self.table
        names = [name for name in LIGHT_FIELDS if name in table.column_names]
        columns = [column_values(table.column(name).chunk(0)) for name in names]
        handles = [(self, row) for row in range(table.num_rows)]
        names.append(FEATURE_ROW)
        columns.append(handles)
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]

    def record(self, row: int) -> dict[str, Any]:
        """Row ``row`` as a whole record, as pipeline.arrowrows.to_rows reads it: for the rare
        input whose message is too large for its case to keep (pipeline.partition)."""
        if self._full is None:
            self._full = to_rows(self.table)
        return self._full[row]

    def add_to(self, stats: FeatureStats, rows: Sequence[int]) -> None:
        """``stats.add_record`` of each row of ``rows``, in order, at once."""
        taken = self.table.take(pa.array(rows, pa.int64())).combine_chunks()
        attributes = _map_entries(taken.column("attributes").chunk(0))
        numbers = _map_entries(taken.column("features").chunk(0))
        if attributes is None or numbers is None:  # a long or repeated key: as add_record does
            for row in rows:
                stats.add_record(self.record(row))
            return
        for name in CATEGORICAL:
            column = taken.column(name).chunk(0).drop_null()
            for value, n in _counts(_cut(column)):
                stats.count(name, value, n)
        keys, values = attributes
        for key, value, n in _pair_counts(keys, _cut(values)):
            stats.count(ATTRIBUTES + key, value, n)
        tokens = taken.column("tokens").chunk(0).drop_null()
        for value, n in _counts(tokens):
            stats.number("tokens", float(value), n)
        keys, values = numbers
        finite = pc.is_finite(values)
        for key, value, n in _pair_counts(keys.filter(finite), values.filter(finite)):
            stats.number(NUMBERS + key, float(value), n)
        _add_embeddings(stats, taken.column("embedding").chunk(0))


def _cut(column: pa.Array) -> pa.Array:
    """Strings as the summaries keep them (pipeline.features.category_text)."""
    if len(column) and pc.max(pc.utf8_length(column)).as_py() > CATEGORY_CHARS:
        return pc.utf8_slice_codeunits(column, 0, CATEGORY_CHARS)  # code points, as str does
    return column


def _counts(column: pa.Array) -> list[tuple[Any, int]]:
    """(value, count) of each distinct value, in the order values first appear."""
    if not len(column):
        return []
    found = pc.value_counts(column)
    return list(zip(found.field(0).to_pylist(), found.field(1).to_pylist(), strict=True))


def _pair_counts(keys: pa.Array, values: pa.Array) -> list[tuple[str, Any, int]]:
    """(key, value, count) of each distinct pair, in the order pairs first appear."""
    if not len(keys):
        return []
    grouped = pa.table({"k": keys, "v": values}).group_by(["k", "v"], use_threads=False)
    found = grouped.aggregate([([], "count_all")])
    return list(
        zip(
            found.column("k").to_pylist(),
            found.column("v").to_pylist(),
            found.column("count_all").to_pylist(),
            strict=True,
        )
    )


def _map_entries(column: pa.MapArray) -> tuple[pa.Array, pa.Array] | None:
    """A map column's keys and values, flat; None if a key is longer than CATEGORY_CHARS or
    appears twice in one row (``add_record`` cuts and dedupes those, row by row)."""
    offsets = column.offsets
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    keys = column.keys.slice(first, last - first)
    values = column.items.slice(first, last - first)
    if not len(keys):
        return keys, values
    if pc.max(pc.utf8_length(keys)).as_py() > CATEGORY_CHARS:
        return None
    sizes = np.diff(offsets.to_numpy())
    rows = np.repeat(np.arange(len(sizes)), sizes)
    distinct = pa.table({"r": rows, "k": keys}).group_by(["r", "k"], use_threads=False)
    if distinct.aggregate([]).num_rows != len(keys):
        return None
    return keys, values


def _add_embeddings(stats: FeatureStats, column: pa.ListArray) -> None:
    """Each row's unit vector added to the sum of its length, in row order."""
    offsets = column.offsets.to_numpy()  # into the whole of column.values
    lengths = np.diff(offsets)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid & (lengths > 0) & (lengths <= EMBEDDING_DIMS))
    if not len(rows):
        return
    flat = column.values.to_numpy(zero_copy_only=False).astype(np.float64)
    distinct, first = np.unique(lengths[rows], return_index=True)
    for length in distinct[np.argsort(first)].tolist():  # in the order they first appear
        of_length = rows[lengths[rows] == length]
        vectors = flat[offsets[of_length][:, None] + np.arange(length)]
        norms = np.array([math.hypot(*vector) for vector in vectors.tolist()])
        usable = (norms != 0) & np.isfinite(norms)  # as pipeline.features._unit
        if not usable.any():
            continue
        units = vectors[usable] / norms[usable, None]
        found = stats.embedding.get(length)
        if found is not None:
            units = np.vstack([np.asarray(found[0], np.float64), units])
        total = np.add.accumulate(units, axis=0)[-1]
        count = int(usable.sum()) + (0 if found is None else found[1])
        stats.embedding[length] = (total.tolist(), count)
