"""Both stages of the five numbers in one process, without Kafka: the worker's own work alone.

Generates N events (bench/throughput's generator and rate), encodes them, spreads them over
partitions by Kafka's default partitioner as the SDK publishes them, and then, timed, runs what a
worker does with them batch by batch: stage 1 decodes each topic's messages at once
(pipeline.arrowcodec), applies them to its partition's core, drains its partials (encoded as
they are sent) and commits its checkpoint records; stage 2 decodes the partials, merges them,
evaluates its alerts and commits its own records. What it leaves out is Kafka: fetching,
producing, the broker. It prints events/s and CPU time per event of each repeat, and the best.

On a shared machine one bench/throughput run moves by a quarter with its neighbours; the best
of a few runs here is the steadier way to compare two versions of the core (run both, in turns).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

from agents.batches import BATCH_EVENTS
from pipeline.arrowcodec import ArrowDecoder
from pipeline.checkpoint import Checkpoint
from pipeline.codec import Codec, CodecError
from pipeline.core import CoreConfig
from pipeline.fastjson import loads
from pipeline.generator import TrafficGenerator
from pipeline.loopview import LoopView, partial_from_json
from pipeline.partials import encode_change
from pipeline.partition import CASES, PartitionCore
from pipeline.processor import partition_key
from pipeline.topics import RECORD_OF
from pipeline.worker import GC_THRESHOLDS

Encoded = tuple[str, bytes]  # (logical topic, the message's value)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def encoded_events(count: int, partitions: int) -> dict[int, list[Encoded]]:
    """``count`` generated events, encoded, by the partition their key goes to."""
    codec = Codec.load()
    partitioner = DefaultPartitioner()
    everything = list(range(partitions))
    generated = TrafficGenerator(1, datetime(2026, 11, 25, tzinfo=UTC), cases_per_second=200.0)
    by_partition: dict[int, list[Encoded]] = {p: [] for p in everything}
    for topic, record in islice(generated, count):
        key = partition_key(topic, record).encode()
        partition = partitioner(key, everything, everything)
        by_partition[partition].append((topic, codec.encode(RECORD_OF[topic], record)))
    return by_partition


def batches(
    by_partition: dict[int, list[Encoded]], size: int
) -> Iterator[tuple[int, list[Encoded]]]:
    """Each partition's next ``size`` messages in turn, as the worker's batches come."""
    longest = max((len(m) for m in by_partition.values()), default=0)
    for start in range(0, longest, size):
        for partition, messages in by_partition.items():
            if messages[start : start + size]:
                yield partition, messages[start : start + size]


class Stages:
    """The worker's two stages over in-memory batches; ``view`` has the numbers."""

    def __init__(self, config: CoreConfig, partitions: int) -> None:
        self.decoder = ArrowDecoder(Codec.load(), light_inputs=True)
        self.cores = {p: PartitionCore(config, p, keeps_previous=True) for p in range(partitions)}
        self.checkpoints = {p: Checkpoint({}, f"{p}/", (CASES,)) for p in range(partitions)}
        self.view = LoopView(config)
        self.view_checkpoint = Checkpoint({}, "view/")
        self.applied = 0
        self.failed = 0

    def apply(self, partition: int, messages: list[Encoded], offset: int) -> None:
        core = self.cores[partition]
        expected = [RECORD_OF[topic] for topic, _ in messages]
        decoded = self.decoder.mixed_rows(expected, [value for _, value in messages])
        for (topic, value), outcome in zip(messages, decoded, strict=True):  # in message order
            if outcome is None or isinstance(outcome, CodecError):  # no tombstones here
                self.failed += 1
            elif core.process(topic, partition_key(topic, outcome), outcome, value) == "ok":
                self.applied += 1
        sent = [encode_change(change) for change in core.drain()]
        previous = core.previous_records()
        self.checkpoints[partition].commit(core.changed_records(), {"source": offset}, previous)
        for value in sent:  # stage 2, as the partials topic hands them over
            self.view.apply(partial_from_json(loads(value)))
        self.view.evaluate()
        self.view.candidates = []
        self.view_checkpoint.commit(self.view.changed_records(), {"partials": offset})


def measure(
    by_partition: dict[int, list[Encoded]], config: CoreConfig, size: int
) -> dict[str, Any]:
    """One timed run over the events: events/s, CPU time per event, and what was counted."""
    stages = Stages(config, len(by_partition))
    events = sum(len(m) for m in by_partition.values())
    started, cpu = time.perf_counter(), time.process_time()
    for offset, (partition, messages) in enumerate(batches(by_partition, size)):
        stages.apply(partition, messages, offset)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "events_per_s": round(events / wall),
        "cpu_us_per_event": round(cpu / events * 1e6, 1),
        "ok": stages.applied,
        "failed": stages.failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=BATCH_EVENTS, help="events per batch")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is kept")
    args = parser.parse_args()
    log(f"generating and encoding {args.events:,} events ...")
    by_partition = encoded_events(args.events, args.partitions)
    gc.freeze()  # as the worker: what was loaded before stays out of the collections
    gc.set_threshold(*GC_THRESHOLDS)
    runs = []
    for n in range(1, args.repeat + 1):
        runs.append(measure(by_partition, CoreConfig(), args.batch))
        log(f"run {n}: {runs[-1]}")
        gc.collect()
    best = min(runs, key=lambda run: run["cpu_us_per_event"])
    print(
        json.dumps(
            {"events": args.events, "partitions": args.partitions, "best": best, "runs": runs}
        )
    )


if __name__ == "__main__":
    main()
