"""Mergeable summaries of input features, the raw material of drift against the eval set.

DESIGN.md names the features: categorical channel, category, language and attributes.<key>;
numeric tokens and features.<key>; the embedding. A FeatureStats holds, per feature, value
counts (categorical), a NumericSummary (numeric) or the sum of unit vectors (embedding). Each
part merges by addition, so the summary of a window is the same whichever buckets, partitions
and workers its inputs went through.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import add
from typing import Any, TypeVar

from pipeline.sketch import BIN_BYTES, SKETCH_BINS, SignedSketch, add_counts

CATEGORICAL = ("channel", "category", "language")
#: Distinct values a NumericSummary keeps exactly; past that it becomes a sketch (1 % bound).
EXACT_VALUES = 512
#: Distinct values a categorical feature is counted by; past that (an id in an attribute, say)
#: every value folds into OTHER. Whether a summary is folded depends only on the union of its
#: values, so any merge order gives the same result; a constant, not a setting, so that every
#: worker and replay fold alike.
CATEGORY_VALUES = 1000
OTHER = "other"
#: Characters of a categorical value or a map key that are kept: a free-text value (a stack
#: trace in an attribute, say) is no category, and up to CATEGORY_VALUES distinct ones of any
#: length made a bucket's partial larger than a Kafka message may be (the worker then stopped
#: at every restart). Inputs and eval cases are cut alike, so coverage and drift compare.
CATEGORY_CHARS = 100
#: Keys of the attributes map (categorical) and of the features map (numeric) a summary keeps
#: apart; past that every key of the map folds into one feature, attributes.other or
#: features.other, by the same union rule, so no producer can grow the state without bound.
KEYS_PER_MAP = 100
ATTRIBUTES, NUMBERS = "attributes.", "features."
# A summary's size is what bounds a bucket's partial message and checkpoint record, and Kafka
# refuses a message past its limit (the worker then stopped at every restart). So besides the
# counts above, the summary's size in JSON bytes (at most) has its own caps, each decided, like
# the others, by the union of the values alone (``FeatureStats.normalize``), so any merge order
# still gives the same summary; ``FEATURES_BYTES`` is what they add up to.
#: JSON bytes of a categorical feature's counts past which it folds into OTHER.
CATEGORY_BYTES = 32 * 1024
#: Weight (JSON bytes, a folded feature counting CATEGORY_BYTES + 1) of the features of one map
#: past which the whole map folds into one feature, attributes.other or features.other.
MAP_BYTES = 512 * 1024
#: JSON bytes of an exact numeric value and its count at most.
NUMBER_BYTES = 36
#: Embeddings longer than this are left out of the summaries (and the baseline).
EMBEDDING_DIMS = 4096
#: Embedding lengths a summary keeps, the shortest ones (one per model; two while it changes).
EMBEDDING_LENGTHS = 2
#: The JSON of a normalized FeatureStats is at most this long (tests/pipeline/test_features.py
#: builds the largest one, ~1.5 MB): three categorical features at CATEGORY_BYTES, two maps at
#: MAP_BYTES, tokens' sketch, two embeddings of EMBEDDING_DIMS, and the names of 100 keys a map
#: of 100 characters that JSON escapes.
FEATURES_BYTES = 2 * 1024 * 1024
T = TypeVar("T")


def finite(value: Any) -> bool:
    """Whether a number can be summarised: missing and non-finite values are left out."""
    return value is not None and math.isfinite(value)


def categories_fold(counts: Mapping[str, int]) -> bool:
    """Whether a categorical feature's counts fold into OTHER: past CATEGORY_VALUES values,
    or past CATEGORY_BYTES."""
    return len(counts) > CATEGORY_VALUES or category_bytes(counts) > CATEGORY_BYTES


def category_bytes(counts: Mapping[str, int]) -> int:
    """The counts' JSON bytes at most, whichever encoder writes them: the values as ASCII-only
    JSON (every other encoding is as short or shorter), and up to 12 bytes a count."""
    return len(json.dumps(list(counts), separators=(",", ":"))) + 11 * len(counts)


def heavy_map(table: Mapping[str, T], prefix: str, weight: Callable[[str, T], int]) -> bool:
    """Whether the ``prefix`` features of ``table`` weigh more than MAP_BYTES together."""
    total = 0
    for name, value in table.items():
        if name.startswith(prefix):
            total += weight(name, value)
            if total > MAP_BYTES:
                return True
    return False


def fold_keys(
    table: dict[str, T], prefix: str, combine: Callable[[list[T]], T], force: bool = False
) -> bool:
    """Fold the ``prefix`` features of ``table`` into ``prefix + OTHER`` when there are more
    than KEYS_PER_MAP of them (or ``force``); returns whether it did."""
    names = [name for name in table if name.startswith(prefix)]
    if not force and len(names) <= KEYS_PER_MAP:
        return False
    table[prefix + OTHER] = combine([table.pop(name) for name in names])
    return True


def total_counts(parts: list[Counter[str]]) -> Counter[str]:
    """Value counts (of one feature or several) folded: everything under OTHER."""
    return Counter({OTHER: sum(sum(counts.values()) for counts in parts)})


def _number_weight(_: str, summary: NumericSummary) -> int:
    return summary.weight()


def _merged_summaries(parts: list[NumericSummary]) -> NumericSummary:
    merged = NumericSummary()
    for summary in parts:
        merged.merge(summary)
    return merged


@dataclass(frozen=True)
class FeatureValues:
    """The features of one input (or eval case), named as in metrics and snapshots."""

    categorical: dict[str, str]
    numeric: dict[str, float]
    embedding: tuple[float, ...] | None


def values_to_json(values: FeatureValues) -> dict[str, Any]:
    return {"c": values.categorical, "n": values.numeric, "e": values.embedding}


def values_from_json(data: Mapping[str, Any] | None) -> FeatureValues:
    if not data:
        return FeatureValues({}, {}, None)
    embedding = data.get("e")
    return FeatureValues(
        dict(data["c"]), dict(data["n"]), None if embedding is None else tuple(embedding)
    )


def stable_digest(text: str, size: int) -> bytes:
    """A BLAKE2b digest of ``size`` bytes of ``text``, the same in every process (unlike
    ``hash``), of any str (a lone surrogate from JSON input too)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).digest()


def category_text(value: Any) -> str:
    """A categorical value or a map key as the summaries keep it: its first CATEGORY_CHARS."""
    text = str(value)
    return text if len(text) <= CATEGORY_CHARS else text[:CATEGORY_CHARS]


def feature_values(record: Mapping[str, Any]) -> FeatureValues:
    """Features of an InputEvent or EvalCase record (both carry the same input fields).
    Missing values are left out; non-finite numbers too, since no distance is defined for them."""
    categorical = {
        name: category_text(record[name]) for name in CATEGORICAL if record.get(name) is not None
    }
    for key, value in (record.get("attributes") or {}).items():
        categorical[ATTRIBUTES + category_text(key)] = category_text(value)
    numeric: dict[str, float] = {}
    if record.get("tokens") is not None:
        numeric["tokens"] = float(record["tokens"])
    for key, value in (record.get("features") or {}).items():
        if finite(value):
            numeric[NUMBERS + category_text(key)] = float(value)
    unit = _unit(record.get("embedding"))
    return FeatureValues(categorical, numeric, None if unit is None else tuple(unit))


def _unit(vector: Iterable[float] | None) -> list[float] | None:
    """The vector scaled to length 1; None when it is missing, zero, not finite or longer than
    EMBEDDING_DIMS."""
    if not vector:
        return None
    values = [float(v) for v in vector]
    if len(values) > EMBEDDING_DIMS:
        return None
    norm = math.hypot(*values)  # inf with any infinite value (even with a NaN), else NaN
    if norm == 0 or not math.isfinite(norm):
        return None
    return [v / norm for v in values]


class NumericSummary:
    """Exact value counts while at most EXACT_VALUES distinct values were seen, then a signed
    DDSketch. Whether a merge is exact depends only on the union of the values, never on the
    order of merging, so windows are reproducible."""

    __slots__ = ("_json", "_sketched", "exact", "sketch")

    def __init__(self, exact: Counter[float] | None = None, sketch: SignedSketch | None = None):
        self.sketch = sketch
        self.exact: Counter[float] | None = None
        if sketch is None:
            self.exact = exact if exact is not None else Counter()
        # The exact values as a sketch, kept once computed: a closed bucket is merged into a
        # sketched window at every evaluation, and mapping its values costs a log each.
        self._sketched: SignedSketch | None = None
        # to_json's result until the next change: a worker's batch sends a changed bucket to
        # stage 2 and to its checkpoint, and the exact values are most of the bucket's size.
        self._json: dict[str, Any] | None = None

    @property
    def is_exact(self) -> bool:
        return self.sketch is None

    @property
    def count(self) -> int:
        return sum(n for _, n in self.points())

    def add(self, value: float, weight: int = 1) -> None:
        self._json = None
        if self.exact is not None:
            self._sketched = None
            self.exact[value] += weight
            if len(self.exact) > EXACT_VALUES:
                self._to_sketch()
        else:
            assert self.sketch is not None
            self.sketch.add(value, weight)

    def _to_sketch(self) -> SignedSketch:
        if self.sketch is None:
            fresh = SignedSketch()
            fresh.merge(self.sketched())
            self.sketch, self.exact, self._sketched = fresh, None, None
        return self.sketch

    def sketched(self) -> SignedSketch:
        """This summary's values as a sketch (the sketch itself once past EXACT_VALUES)."""
        if self.sketch is not None:
            return self.sketch
        if self._sketched is None:
            self._sketched = SignedSketch()
            for value, weight in (self.exact or {}).items():
                self._sketched.add(value, weight)
        return self._sketched

    def merge(self, other: NumericSummary) -> None:
        self._json = None
        if self.exact is not None and other.exact is not None:
            self._sketched = None
            add_counts(self.exact, other.exact)
            if len(self.exact) > EXACT_VALUES:
                self._to_sketch()
        elif other.exact is not None:
            self._to_sketch().merge(other.sketched())
        else:
            assert other.sketch is not None
            self._to_sketch().merge(other.sketch)

    def limit(self) -> None:
        """Collapse the sketch's smallest bins past SKETCH_BINS (pipeline.sketch)."""
        if self.sketch is not None and self.sketch.collapse():
            self._json = None

    def weight(self) -> int:
        """JSON bytes at most; a sketch weighs at least as much as any exact summary, so the
        weight only grows as values are added or merged."""
        if self.exact is not None:  # {"x":[...],"n":[...]}
            return NUMBER_BYTES * len(self.exact) + 16
        assert self.sketch is not None  # {"s":{"p":{...},"n":{...},"z":...}}: two bins' worth
        positive, negative = self.sketch.positive, self.sketch.negative
        bins = min(len(positive), SKETCH_BINS) + min(len(negative), SKETCH_BINS)
        return max(NUMBER_BYTES * (EXACT_VALUES + 1), BIN_BYTES * (bins + 2))

    @classmethod
    def of(cls, values: Iterable[float]) -> NumericSummary:
        summary = cls()
        for value in values:
            summary.add(value)
        return summary

    def points(self) -> list[tuple[float, int]]:
        """(value, count) pairs: the values themselves, or sketch bins within 1 % of them."""
        if self.exact is not None:
            return list(self.exact.items())
        assert self.sketch is not None
        return self.sketch.points()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NumericSummary):
            return NotImplemented
        return sorted(self.points()) == sorted(other.points())

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        """Exact values as two flat lists (values, counts): built and encoded at C speed."""
        if self._json is None:
            if self.exact is not None:
                self._json = {"x": list(self.exact), "n": list(self.exact.values())}
            else:
                assert self.sketch is not None
                self._json = {"s": self.sketch.to_json()}
        return self._json

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NumericSummary:
        if "x" in data:
            return cls(Counter(dict(zip(map(float, data["x"]), map(int, data["n"]), strict=True))))
        if "v" in data:  # (value, count) pairs, as checkpoints before 2026-11-26 hold them
            return cls(Counter({float(v): int(n) for v, n in data["v"]}))
        return cls(sketch=SignedSketch.from_json(data["s"]))


@dataclass
class FeatureStats:
    """Per feature: categorical value counts, numeric summaries, embedding sums by dimension."""

    categorical: dict[str, Counter[str]] = field(default_factory=dict)
    numeric: dict[str, NumericSummary] = field(default_factory=dict)
    embedding: dict[int, tuple[list[float], int]] = field(default_factory=dict)
    folded: set[str] = field(default_factory=set)  # categorical features past CATEGORY_VALUES
    folded_maps: set[str] = field(default_factory=set)  # ATTRIBUTES, NUMBERS past KEYS_PER_MAP
    # category_bytes of each unfolded categorical feature, by how many values it had then:
    # values are only ever added, so the same number of values is the same set of them.
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.categorical or self.numeric or self.embedding)

    def add(self, values: FeatureValues) -> None:
        for name, value in values.categorical.items():
            self.count(name, value)
        for name, number in values.numeric.items():
            self.number(name, number)
        if values.embedding is not None:
            self._add_embedding(list(values.embedding), 1)

    def add_record(self, record: Mapping[str, Any]) -> None:
        """``add(feature_values(record))`` without the FeatureValues in between: stage 1 adds
        every input this way, and building them was about half of the cost."""
        for name in CATEGORICAL:
            value = record.get(name)
            if value is not None:
                self.count(name, category_text(value))
        # Keys that agree in their first CATEGORY_CHARS are one feature, the last value kept,
        # as in feature_values (so the eval set's side counts them alike).
        attributes = record.get("attributes")
        if attributes:
            if max(map(len, attributes)) > CATEGORY_CHARS:
                attributes = {category_text(key): value for key, value in attributes.items()}
            for key, value in attributes.items():
                self.count(ATTRIBUTES + key, category_text(value))
        tokens = record.get("tokens")
        if tokens is not None:
            self.number("tokens", float(tokens))
        numbers = record.get("features")
        if numbers:
            if max(map(len, numbers)) > CATEGORY_CHARS:
                numbers = {category_text(k): v for k, v in numbers.items() if finite(v)}
            for key, value in numbers.items():
                if finite(value):
                    self.number(NUMBERS + key, float(value))
        unit = _unit(record.get("embedding"))
        if unit is not None:
            self._add_embedding(unit, 1)

    def count(self, name: str, value: str, n: int = 1) -> None:
        """Count ``value`` of categorical feature ``name`` ``n`` times."""
        if ATTRIBUTES in self.folded_maps and name.startswith(ATTRIBUTES):
            name = ATTRIBUTES + OTHER
        counts = self.categorical.get(name)
        if counts is None:
            counts = self.categorical[name] = Counter()
            if name.startswith(ATTRIBUTES) and self._fold_keys(ATTRIBUTES):
                name, counts = ATTRIBUTES + OTHER, self.categorical[ATTRIBUTES + OTHER]
        if name in self.folded:
            counts[OTHER] += n
        else:
            counts[value] += n
            if len(counts) > CATEGORY_VALUES:
                self._fold(name)

    def number(self, name: str, number: float, n: int = 1) -> None:
        """Add ``number`` to numeric feature ``name`` ``n`` times."""
        if NUMBERS in self.folded_maps and name.startswith(NUMBERS):
            name = NUMBERS + OTHER
        summary = self.numeric.get(name)
        if summary is None:
            summary = self.numeric[name] = NumericSummary()
            if name.startswith(NUMBERS) and self._fold_keys(NUMBERS):
                summary = self.numeric[NUMBERS + OTHER]
        summary.add(number, n)

    def _add_embedding(self, vector: list[float], count: int) -> None:
        found = self.embedding.get(len(vector))
        if found is None:
            self.embedding[len(vector)] = (vector, count)
        else:
            total, n = found
            self.embedding[len(vector)] = (list(map(add, total, vector)), n + count)

    def _fold(self, name: str) -> None:
        self.categorical[name] = total_counts([self.categorical[name]])
        self.folded.add(name)

    def _fold_keys(self, prefix: str, force: bool = False) -> bool:
        if prefix == ATTRIBUTES:
            if not fold_keys(self.categorical, prefix, total_counts, force):
                return False
            self.folded = {n for n in self.folded if not n.startswith(prefix)}
            self.folded.add(prefix + OTHER)
        elif not fold_keys(self.numeric, prefix, _merged_summaries, force):
            return False
        self.folded_maps.add(prefix)
        return True

    def merge(self, other: FeatureStats) -> None:
        """Add ``other``'s counts, folding by value and key counts; the size caps are left to
        ``normalize``."""
        for name, counts in other.categorical.items():
            mine = self.categorical.get(name)
            if mine is None:
                mine = self.categorical[name] = Counter(counts)
            else:
                add_counts(mine, counts)
            if name in self.folded or name in other.folded or len(mine) > CATEGORY_VALUES:
                self._fold(name)
        for name, summary in other.numeric.items():
            found = self.numeric.get(name)
            if found is None:
                found = self.numeric[name] = NumericSummary()
            found.merge(summary)
        for vector, count in other.embedding.values():
            self._add_embedding(list(vector), count)
        for prefix in (ATTRIBUTES, NUMBERS):
            self._fold_keys(prefix, prefix in self.folded_maps or prefix in other.folded_maps)

    def normalize(self) -> FeatureStats:
        """Apply the size caps: a categorical feature past CATEGORY_BYTES folds, a map past
        MAP_BYTES folds, sketches keep SKETCH_BINS bins a sign, and the EMBEDDING_LENGTHS
        shortest embedding lengths stay. Each depends only on the union of the values (a weight
        never shrinks as values are added), so the normalized merge of normalized parts is the
        normalized whole. ``merge`` leaves this to its caller, who merges many parts at once."""
        for name in [n for n in self.categorical if n not in self.folded]:
            if self._bytes(name) > CATEGORY_BYTES:
                self._fold(name)
        if ATTRIBUTES not in self.folded_maps and heavy_map(
            self.categorical, ATTRIBUTES, self._category_weight
        ):
            self._fold_keys(ATTRIBUTES, force=True)
        if NUMBERS not in self.folded_maps and heavy_map(self.numeric, NUMBERS, _number_weight):
            self._fold_keys(NUMBERS, force=True)
        for summary in self.numeric.values():
            summary.limit()
        for length in sorted(self.embedding)[EMBEDDING_LENGTHS:]:
            del self.embedding[length]
        return self

    def _category_weight(self, name: str, _: Counter[str]) -> int:
        return CATEGORY_BYTES + 1 if name in self.folded else self._bytes(name)

    def _bytes(self, name: str) -> int:
        counts = self.categorical[name]
        known = self._sizes.get(name)
        if known is None or known[0] != len(counts):
            known = self._sizes[name] = (len(counts), category_bytes(counts))
        return known[1]

    def to_json(self) -> dict[str, Any]:
        """The normalized summary: what is sent and stored stays within FEATURES_BYTES."""
        self.normalize()
        return {
            "c": {name: dict(counts) for name, counts in self.categorical.items()},
            "n": {name: summary.to_json() for name, summary in self.numeric.items()},
            "e": [[vector, count] for vector, count in self.embedding.values()],
            "x": sorted(self.folded),
            "xm": sorted(self.folded_maps),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> FeatureStats:
        if not data:
            return cls()
        return cls(
            {name: Counter(counts) for name, counts in data["c"].items()},
            {name: NumericSummary.from_json(s) for name, s in data["n"].items()},
            {len(vector): (list(vector), int(count)) for vector, count in data["e"]},
            set(data.get("x", ())),
            set(data.get("xm", ())),
        )
