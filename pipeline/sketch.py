"""A mergeable latency sketch: DDSketch's logarithmic mapping over a sparse bin store.

Why DDSketch (Datadog's ``ddsketch`` library): its LogarithmicMapping guarantees that every
quantile it returns is within a relative error of ``relative_accuracy`` (here 1 %) of an actual
value at that rank, and two sketches merge exactly by adding bin counts, so partial sketches from
many partitions and buckets combine into the same sketch as one that saw every value. The
library's own stores are dense (a 10 s bucket of latencies from 1 ms to 1 h would carry ~800 bins);
keeping the bins in a dict costs only the bins that are used, and serialises as plain JSON.
Quantiles follow ``ddsketch.DDSketch.get_quantile_value`` exactly (rank = q * (count - 1)).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, TypeVar

from ddsketch.mapping import LogarithmicMapping

RELATIVE_ACCURACY = 0.01
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)
#: Bins a SignedSketch keeps per sign: the largest magnitudes, the smaller ones collapsed into
#: the smallest kept bin, as DDSketch's collapsing stores do. 2,048 bins hold values across
#: about 17 orders of magnitude at the full accuracy; past that the smallest ones lose it.
SKETCH_BINS = 2048
#: JSON bytes of one bin and its count at most (a key of up to 6 characters, counts below 10^10).
BIN_BYTES = 20

K = TypeVar("K")


def add_counts(target: Counter[K], source: Mapping[K, int]) -> None:
    """target += source, count by count: Counter.update does the same with a type check and
    a method lookup per call, which shows when windows merge hundreds of buckets."""
    get = target.get
    for key, count in source.items():
        target[key] = get(key, 0) + count


class LatencySketch:
    """Non-negative values (seconds); values below the mapping's minimum count as zero."""

    __slots__ = ("bins", "zero")

    def __init__(self, bins: Counter[int] | None = None, zero: int = 0) -> None:
        self.bins: Counter[int] = bins if bins is not None else Counter()
        self.zero = zero

    @property
    def count(self) -> int:
        return self.zero + sum(self.bins.values())

    def add(self, value: float, weight: int = 1) -> None:
        if value < 0:
            raise ValueError(f"latency must be non-negative, got {value}")
        if value < _MAPPING.min_possible:
            self.zero += weight
        else:
            self.bins[_MAPPING.key(value)] += weight

    def merge(self, other: LatencySketch) -> None:
        add_counts(self.bins, other.bins)
        self.zero += other.zero

    def quantile(self, q: float) -> float | None:
        """The q-quantile within the relative-accuracy bound, or None when empty."""
        count = self.count
        if count == 0:
            return None
        rank = q * (count - 1)
        if rank < self.zero:
            return 0.0
        running = float(self.zero)
        for key in sorted(self.bins):
            running += self.bins[key]
            if running > rank:
                return float(_MAPPING.value(key))
        return float(_MAPPING.value(max(self.bins)))

    def to_json(self) -> dict[str, Any]:
        return {"zero": self.zero, "bins": {str(k): v for k, v in self.bins.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencySketch:
        return cls(Counter({int(k): int(v) for k, v in data["bins"].items()}), int(data["zero"]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencySketch):
            return NotImplemented
        return self.zero == other.zero and +self.bins == +other.bins

    __hash__ = None  # type: ignore[assignment]


class SignedSketch:
    """The same mapping for values of any sign: a bin store per sign and a zero count, so
    numeric input features (which may be negative) are summarised with the same 1 % bound."""

    __slots__ = ("negative", "positive", "zero")

    def __init__(
        self,
        positive: Counter[int] | None = None,
        negative: Counter[int] | None = None,
        zero: int = 0,
    ) -> None:
        self.positive: Counter[int] = positive if positive is not None else Counter()
        self.negative: Counter[int] = negative if negative is not None else Counter()
        self.zero = zero

    def add(self, value: float, weight: int = 1) -> None:
        if abs(value) < _MAPPING.min_possible:
            self.zero += weight
        elif value > 0:
            self.positive[_MAPPING.key(value)] += weight
        else:
            self.negative[_MAPPING.key(-value)] += weight

    def merge(self, other: SignedSketch) -> None:
        add_counts(self.positive, other.positive)
        add_counts(self.negative, other.negative)
        self.zero += other.zero

    def collapse(self) -> bool:
        """Keep SKETCH_BINS bins per sign; returns whether any were collapsed. The bins kept
        are the largest keys of the union of the values, and every smaller one adds to the
        smallest kept, so collapsing before or after a merge gives the same sketch."""
        changed = False
        for store in (self.positive, self.negative):
            if len(store) > SKETCH_BINS:
                keys = sorted(store, reverse=True)
                floor = keys[SKETCH_BINS - 1]
                store[floor] += sum(store.pop(key) for key in keys[SKETCH_BINS:])
                changed = True
        return changed

    def points(self) -> list[tuple[float, int]]:
        """(representative value, count) of every bin: each value within 1 % of its bin's."""
        found = [(-float(_MAPPING.value(k)), n) for k, n in self.negative.items()]
        found += [(float(_MAPPING.value(k)), n) for k, n in self.positive.items()]
        if self.zero:
            found.append((0.0, self.zero))
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "p": {str(k): v for k, v in self.positive.items()},
            "n": {str(k): v for k, v in self.negative.items()},
            "z": self.zero,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SignedSketch:
        return cls(
            Counter({int(k): int(v) for k, v in data["p"].items()}),
            Counter({int(k): int(v) for k, v in data["n"].items()}),
            int(data["z"]),
        )
