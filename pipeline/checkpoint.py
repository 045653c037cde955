"""Crash-consistent state in a changelog, without Kafka transactions.

faust-streaming's ``exactly_once`` guarantee is not usable (it crashes at start-up, #440, and
still duplicates after a kill, #517), and at-least-once alone would count the events between
the last offset commit and a SIGKILL twice: their table writes survive, and they are processed
again. So every batch of work on a partition is checkpointed like this:

1. each changed record is written as an envelope (generation g, new value, value as of the last
   checkpoint), all to the partition's changelog;
2. then the checkpoint marker (g, and the next source offset of every topic) is written last.

Writes to one changelog partition are durable in order, so after a crash the changelog holds
some prefix of them. On restore, a record whose generation is newer than the last durable
marker belongs to an unfinished batch and is rolled back to its previous value; events before
the marker's offsets are skipped as already applied. The state is therefore exactly the state
at the marker, whatever the crash point, and nothing is counted twice or lost.

Pure code: the store is any mutable mapping (the worker passes its faust table's data).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, NamedTuple, Protocol, TypeVar

import msgspec

from pipeline.fastjson import dumps, loads
from pipeline.formats import FORMAT_VERSION, check_format

MARKER = "~checkpoint"


class _WireEnvelope(msgspec.Struct):
    """An envelope as written, with its values left as the JSON bytes they are."""

    g: int
    v: msgspec.Raw
    p: msgspec.Raw


_decode_envelope = msgspec.json.Decoder(_WireEnvelope).decode


class Envelope(NamedTuple):
    generation: int
    value: bytes | None  # JSON; None = deleted
    previous: bytes | None  # the value as of the last checkpoint before this generation

    def encode(self) -> bytes:
        return encode_envelope(self.generation, self.value, self.previous)

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        try:
            wire = _decode_envelope(raw)
        except msgspec.DecodeError:  # NaN, written with the standard library before
            data = json.loads(raw)
            return cls(int(data["g"]), _stdlib_dumps(data["v"]), _stdlib_dumps(data["p"]))
        return cls(wire.g, _value(wire.v), _value(wire.p))


def encode_envelope(generation: int, value: bytes | None, previous: bytes | None) -> bytes:
    """An envelope's changelog bytes (also without making the Envelope, once per record)."""
    return b'{"g":%d,"v":%s,"p":%s}' % (
        generation,
        value if value is not None else b"null",
        previous if previous is not None else b"null",
    )


def _value(raw: msgspec.Raw) -> bytes | None:
    data = bytes(raw)
    return None if data == b"null" else data


def _stdlib_dumps(value: Any) -> bytes | None:
    return None if value is None else json.dumps(value, separators=(",", ":")).encode()


def _dumps(value: Any) -> bytes | None:
    if isinstance(value, msgspec.Raw):  # encoded already (pipeline.partials.EncodedBuckets)
        return bytes(value)
    return None if value is None else dumps(value)


Write = tuple[bytes, bytes | None]  # (store key, encoded value); None = tombstone


class _Record(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def offset(self) -> int: ...


Positioned = TypeVar("Positioned", bound=_Record)  # a consumed record: its topic and offset


class Marker(NamedTuple):
    """A partition's last durable checkpoint: its generation and the next source offset of
    each topic it read (the records before it are in the state)."""

    generation: int
    offsets: dict[str, int]


def read_marker(store: Mapping[bytes, Any], prefix: str) -> Marker | None:
    """The checkpoint marker under ``prefix`` in ``store``, or None if it holds none."""
    raw = store.get(prefix.encode() + MARKER.encode())
    if raw is None:
        return None
    data = loads(raw)
    check_format(data, f"the checkpointed state of {prefix!r}")
    return Marker(int(data["g"]), {str(t): int(o) for t, o in data["offsets"].items()})


def next_offsets(records: Iterable[_Record]) -> dict[str, int]:
    """The offset after the highest of each topic's records: where a batch's checkpoint says
    the state goes on from (the highest, as a record may come twice, ``unapplied``)."""
    following: dict[str, int] = {}
    for record in records:
        following[record.topic] = max(record.offset + 1, following.get(record.topic, 0))
    return following


class Checkpoint:
    """The checkpointed records of one partition, under ``prefix`` in ``store``.

    The store keeps each record's last written value, the previous value of its next write.
    Records whose keys start with one of ``held`` it takes out of the store once restored:
    their caller holds them anyway (stage 1's cases, most of the state) and hands their values
    as of the last checkpoint to ``commit`` as ``before``, so neither they nor their keys are
    in memory twice."""

    def __init__(
        self, store: MutableMapping[bytes, Any], prefix: str, held: tuple[str, ...] = ()
    ) -> None:
        self.store = store
        self.prefix = prefix.encode()
        self.held = held
        # restored state, as of the last durable marker (held records as JSON bytes)
        self.values: dict[str, Any] = {}
        self.offsets: dict[str, int] = {}  # topic -> next offset not yet in the state
        self._rewrite: dict[str, bytes | None] = {}  # rolled back: write their old value again
        self._deleted: set[str] = set()  # written as deleted; dropped once checkpointed
        self.committed = 0
        newest = 0
        marker = read_marker(store, prefix)
        if marker is not None:
            self.committed = newest = marker.generation
            self.offsets = marker.offsets
        for full, raw in [(k, v) for k, v in store.items() if k.startswith(self.prefix)]:
            key = full[len(self.prefix) :].decode()
            if key == MARKER:
                continue
            envelope = raw if isinstance(raw, Envelope) else Envelope.decode(raw)
            newest = max(newest, envelope.generation)
            value = envelope.value
            if envelope.generation > self.committed:  # an unfinished batch: roll back
                value = envelope.previous
                self._rewrite[key] = value
            if key.startswith(held):
                del store[full]
            else:
                store[full] = envelope
            if value is None:
                self._deleted.add(key)
            else:  # a held record as its JSON: its caller decodes it into its own type
                self.values[key] = value if key.startswith(held) else loads(value)
        self.generation = newest + 1

    def unapplied(self, records: Iterable[Positioned]) -> list[Positioned]:
        """The records the state does not hold yet: those from each topic's checkpointed
        offset on, each offset once. A consumer may hand a record over twice (Faust's read
        offset lets a fetch through that starts at the last record read), and within a batch
        the checkpoint's offsets have not moved yet, so the offsets seen are followed here;
        ``records`` are in offset order within each topic, as a partition's batch is."""
        following: dict[str, int] = {}
        fresh = []
        for record in records:
            topic, offset = record.topic, record.offset
            if offset >= following.get(topic, self.offsets.get(topic, 0)):
                fresh.append(record)
                following[topic] = offset + 1
        return fresh

    def commit(
        self,
        changed: Mapping[str, Any],
        offsets: Mapping[str, int],
        before: Mapping[str, bytes | None] | None = None,
    ) -> list[Write]:
        """Record one batch: the writes to send to the changelog, in order, marker last.

        ``changed`` maps record keys to their new JSON value (None = deleted); ``offsets`` maps
        topics to the next offset after the batch; ``before`` maps each changed held key to its
        JSON as of the last checkpoint (None: there was none)."""
        g = self.generation
        writes: list[Write] = []
        encoded = {key: _dumps(value) for key, value in changed.items()}
        rolled_back = self._rewrite  # value as of the marker of records written after it
        for key, value in rolled_back.items():
            encoded.setdefault(key, value)
        for key in self._deleted - encoded.keys():  # written deleted: now a tombstone
            full = self.prefix + key.encode()
            if self.store.pop(full, None) is not None or key.startswith(self.held):
                writes.append((full, None))
        self._rewrite, self._deleted = {}, set()
        for key, value in encoded.items():
            full = self.prefix + key.encode()
            held = key.startswith(self.held)
            if held:  # changed by the caller (``before`` has it) or only rolled back
                previous = (before or {})[key] if key in changed else rolled_back[key]
            else:
                old = self.store.get(full)
                if old is None:
                    previous = None
                elif old.generation <= self.committed:
                    previous = old.value
                else:
                    previous = old.previous
            if value is None and previous is None:
                # A record of an unfinished batch, rolled back to none, is in the changelog.
                if self.store.pop(full, None) is not None or key in rolled_back:
                    writes.append((full, None))
                continue
            writes.append((full, encode_envelope(g, value, previous)))
            # In memory the value is enough: once this batch's marker is written (below), the
            # next batch takes this value as its previous one. Not keeping the previous value
            # as well saves about 500 bytes per live case (the bench's cases, measured).
            if not held:
                self.store[full] = Envelope(g, value, None)
            if value is None:
                self._deleted.add(key)
        self.offsets.update(offsets)
        marker = dumps({"g": g, "offsets": self.offsets, "v": FORMAT_VERSION})
        self.store[self.prefix + MARKER.encode()] = marker
        writes.append((self.prefix + MARKER.encode(), marker))
        self.committed, self.generation = g, g + 1
        return writes
