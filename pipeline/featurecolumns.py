"""Input features added to their summaries a batch at a time, from the Arrow columns stage 1
decodes (pipeline.arrowcodec), instead of input by input from Python dicts.

Adding an input's features one by one (``FeatureStats.add_record``) and first turning its maps
and embedding into Python objects were about a fifth of a worker's time. Here a batch's inputs
stay in Arrow: the core (pipeline.partition) gets light rows (the fields it joins and counts
by, and a ``FEATURE_ROW`` handle), notes which bucket each input went to, and adds each
bucket's rows at once before anything reads the bucket.

The result is the summary ``add_record`` gives, exactly, not within a bound: counts are counted
per distinct value (the summaries' folds depend only on the union of the values, so adding a
value n times at once folds alike), each feature's values come in the order they first appear
(the features themselves may not, when an input lacks one that a later one has: nothing reads
their order, as merges across partitions change it anyway), and embeddings are normalised by
``math.hypot`` as ``add_record`` does and summed one row after the other
(``np.add.accumulate``), so the float sums round alike. A batch whose maps hold a key
longer than CATEGORY_CHARS, or a key twice in one row (Avro allows it; the codec keeps the
last), is added row by row with ``add_record``.

The columns are turned into numpy codes once per batch (``_Prepared``); each bucket's rows are
then counted with a stable sort (``_first_counts``): Arrow's group-by costs about a millisecond
a call, more than the rows of a bucket took one by one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from pipeline.arrowrows import column_values, to_rows
from pipeline.features import (
    ATTRIBUTES,
    CATEGORICAL,
    CATEGORY_CHARS,
    EMBEDDING_DIMS,
    NUMBERS,
    FeatureStats,
    category_text,
)

#: The key of a light input row that holds its (InputColumns, row) handle: no Avro field
#: name can start with "@".
FEATURE_ROW = "@features"
#: The fields of an input row that stage 1 reads besides its features.
LIGHT_FIELDS = ("event_id", "case_id", "loop", "ts", "source", "category")


class InputColumns:
    """One decoded batch of InputEvent records (an Arrow table of one chunk). Its feature
    columns are read when it is made, so that a table Arrow cannot read fails where the caller
    can still decode its messages one by one (pipeline.arrowcodec), not when the batch drains."""

    __slots__ = ("_full", "_prepared", "table")

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()
        self._prepared = _Prepared(self.table)
        # added row by row when not plain: the whole records are read now too
        self._full = None if self._prepared.plain else to_rows(self.table)

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
        """``stats.add_record`` of each row of ``rows`` (ascending), in order, at once."""
        prepared = self._prepared
        if not prepared.plain:  # a long or repeated key: as add_record does
            for row in rows:
                stats.add_record(self.record(row))
            return
        picked = np.asarray(rows, np.int64)
        for name, (codes, values) in prepared.categorical.items():
            found = codes[picked]
            for code, n in _first_counts(found[found >= 0]):
                stats.count(name, values[code], n)
        selected = np.zeros(self.table.num_rows, bool)
        selected[picked] = True
        entries = prepared.attributes
        chosen = selected[entries.rows]
        for key, value, n in _first_counts(entries.keys[chosen], entries.values[chosen]):
            stats.count(ATTRIBUTES + entries.key_names[key], entries.value_names[value], n)
        tokens = prepared.tokens[picked][prepared.has_tokens[picked]]
        for value, n in _first_counts(tokens):
            stats.number("tokens", float(value), n)
        numbers = prepared.numbers
        chosen = selected[numbers.rows] & numbers.finite
        for key, number, n in _first_counts(numbers.keys[chosen], numbers.numbers[chosen]):
            stats.number(NUMBERS + numbers.key_names[key], number, n)
        _add_embeddings(stats, prepared, picked)


class _Entries:
    """A map column's entries: the row each belongs to, its key as a code into ``key_names``,
    and its value as a code into ``value_names`` (strings) or as ``numbers``."""

    def __init__(self, column: pa.MapArray) -> None:
        offsets = column.offsets.to_numpy()  # into the whole of keys and items
        first, last = int(offsets[0]), int(offsets[-1])
        self.rows = np.repeat(np.arange(len(column)), np.diff(offsets))
        self.keys, self.key_names = _codes(column.keys.slice(first, last - first))
        items = column.items.slice(first, last - first)
        if pa.types.is_string(items.type):
            self.values, names = _codes(items)
            self.value_names = [category_text(name) for name in names]
        else:
            self.numbers = items.to_numpy(zero_copy_only=False)
            self.finite = np.isfinite(self.numbers)

    def plain(self) -> bool:
        """No key longer than CATEGORY_CHARS, none twice in a row."""
        if any(len(name) > CATEGORY_CHARS for name in self.key_names):
            return False
        pairs = self.rows * max(len(self.key_names), 1) + self.keys
        return len(np.unique(pairs)) == len(pairs)


class _Prepared:
    """A batch's feature columns as numpy arrays, made once for all of its buckets."""

    def __init__(self, table: pa.Table) -> None:
        self.categorical: dict[str, tuple[NDArray[np.int64], list[str]]] = {}
        for name in CATEGORICAL:
            codes, names = _codes(table.column(name).chunk(0))
            self.categorical[name] = codes, [category_text(value) for value in names]
        self.attributes = _Entries(table.column("attributes").chunk(0))
        self.numbers = _Entries(table.column("features").chunk(0))
        self.plain = self.attributes.plain() and self.numbers.plain()
        tokens = table.column("tokens").chunk(0)
        self.has_tokens = tokens.is_valid().to_numpy(zero_copy_only=False)
        self.tokens = tokens.fill_null(0).to_numpy(zero_copy_only=False)
        embedding = table.column("embedding").chunk(0)
        self.offsets = embedding.offsets.to_numpy()  # into the whole of embedding.values
        self.vectors = embedding.values.to_numpy(zero_copy_only=False).astype(np.float64)
        self.has_embedding = embedding.is_valid().to_numpy(zero_copy_only=False)


def _codes(column: pa.Array) -> tuple[NDArray[np.int64], list[str]]:
    """A string column as codes into its distinct values (in the order they first appear),
    -1 for null."""
    encoded = pc.dictionary_encode(column)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _first_counts(*columns: NDArray[Any]) -> list[tuple[Any, ...]]:
    """(values..., count) of each distinct combination of the columns' values, in the order
    combinations first appear, as Python values: a stable sort, so that each run of equal
    values starts at its first appearance (floats compare as a Counter's keys do: -0.0 is
    0.0, and the value kept is the first one)."""
    size = len(columns[0])
    if not size:
        return []
    order = np.lexsort(columns[::-1])
    change = np.zeros(size, bool)
    change[0] = True
    for column in columns:
        ordered = column[order]
        change[1:] |= ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(change)
    counts = np.diff(np.append(starts, size))
    firsts = order[starts]
    by_first = np.argsort(firsts, kind="stable")
    found = [column[firsts[by_first]].tolist() for column in columns]
    return list(zip(*found, counts[by_first].tolist(), strict=True))


def _add_embeddings(stats: FeatureStats, prepared: _Prepared, rows: NDArray[np.int64]) -> None:
    """Each row's unit vector added to the sum of its length, in row order."""
    offsets = prepared.offsets
    lengths = offsets[rows + 1] - offsets[rows]
    usable_rows = prepared.has_embedding[rows] & (lengths > 0) & (lengths <= EMBEDDING_DIMS)
    rows, lengths = rows[usable_rows], lengths[usable_rows]
    if not len(rows):
        return
    for length, _ in _first_counts(lengths):  # in the order they first appear
        of_length = rows[lengths == length]
        vectors = prepared.vectors[offsets[of_length][:, None] + np.arange(length)]
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
