"""Fencing a worker that stalled: it checks it still holds its partitions before it writes.

A worker whose whole process stalls for longer than its session timeout (a VM freeze,
SIGSTOP) has lost its partitions to another worker by the time it wakes, but its consumer
hears of that only at its next heartbeat. Meanwhile it would finish the batch in hand and write
it: a stale partial for stage 2, and changelog records after the new owner's, which a later
restore of the partition reads as the newest (README, Guarantees: "Fenced"). Kafka transactions
would fence such writes; faust-streaming's do not work (pipeline.checkpoint).

So the event loop ticks (``StallWatch``), and a batch handler asks ``Fence.ensure_member``
before its writes: when the loop has not ticked for a third of the session timeout since the
last check, the worker commits again the offsets its group already has for the batch's
partitions, which the coordinator refuses from a member it has dropped. A refused worker raises
``Fenced``, writes nothing more, and exits at once (agents.batches); restarted, it rejoins and
restores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

log = logging.getLogger(__name__)


class Fenced(RuntimeError):
    """The group no longer counts this worker a member: another may own its partitions."""


class StallWatch:
    """Notes when the process stalled: the event loop calls ``tick`` every half second
    (pipeline.app), and a tick (or a look) that comes more than ``threshold`` after the one
    before means the process stood still, heartbeats included (or the loop was blocked that
    long, which costs one needless check)."""

    def __init__(self, threshold: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.clock = clock
        self.last_tick = clock()
        self.stalled_at: float | None = None  # the latest stall noticed

    def tick(self) -> None:
        self._look()
        self.last_tick = self.clock()

    def stalled_since(self, checked_at: float) -> bool:
        """Whether the process stalled after ``checked_at`` (a clock reading)."""
        self._look()
        return self.stalled_at is not None and self.stalled_at > checked_at

    def _look(self) -> None:
        now = self.clock()
        if now - self.last_tick > self.threshold:
            self.stalled_at = now


class Fence:
    """One stage's check of its membership before it writes a batch."""

    def __init__(
        self, app: Any, watch: StallWatch, stall_at_check: int = 0, hang_at_check: int = 0
    ) -> None:
        self.app = app
        self.watch = watch
        self.checked_at = watch.clock()
        self.stall_at_check = stall_at_check  # LOOPLINE_FAULT_STALL_AT_CHECK, for tests
        self.hang_at_check = hang_at_check  # LOOPLINE_FAULT_HANG_AT_CHECK, for tests
        self.checks = 0

    async def ensure_member(self, batch: dict[int, list[Any]], generation: int) -> None:
        """Return at once unless the process stalled since the last check; then raise
        ``Fenced`` unless the group still counts this worker the owner of ``batch``'s
        partitions in ``generation``, the consumer generation the batch was taken in."""
        self.checks += 1
        if self.checks == self.stall_at_check:
            # this stage's writes so far delivered: what it has in hand is all it could write
            await self.app.producer.flush()
            log.warning("LOOPLINE_FAULT_STALL_AT_CHECK: stopping the process (SIGSTOP)")
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.checks == self.hang_at_check:  # a stage stuck while the process lives on
            log.warning("LOOPLINE_FAULT_HANG_AT_CHECK: this stage waits for good")
            await asyncio.Event().wait()
        checked_at = self.watch.clock()
        if not self.watch.stalled_since(self.checked_at):
            self.checked_at = checked_at
            return
        consumer = self.app.consumer
        offsets: dict[TopicPartition, int] = {}
        for records in batch.values():
            for record in records:
                tp = TopicPartition(record.topic, record.partition)
                if tp not in offsets:
                    committed = consumer._committed_offset.get(tp)
                    offsets[tp] = record.offset if committed is None else committed
        owned = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(offsets))
        log.warning("the process stood still; checking it still owns %s", owned)
        thread = consumer._thread
        if not await thread.call_thread(_commit_again, thread, offsets, generation):
            raise Fenced(
                "the group dropped this worker while the process stood still (longer than "
                "LOOPLINE_SESSION_TIMEOUT_SECONDS): another worker may own its partitions, so "
                "it writes nothing of the batch in hand and stops; restarted, it rejoins"
            )
        self.checked_at = checked_at


async def _commit_again(thread: Any, offsets: dict[TopicPartition, int], generation: int) -> bool:
    """On the consumer's thread: commit ``offsets`` (what the group has already, or where the
    batch starts) as this member of ``generation``; False if the client or the coordinator says
    it is not one. The client may have rejoined first, or rejoin while the commit waits (its
    heartbeat heard of it): as another member, so its generation is checked on both sides."""
    client = thread._ensure_consumer()
    if client._coordinator.generation != generation or not set(offsets) <= client.assignment():
        return False
    try:
        await client.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    except KafkaError as exc:  # CommitFailedError: "the group has already rebalanced"
        # Refused in a rebalance too: a member dropped rejoins as a new one, whose
        # partitions and state may differ, so "rebalance in progress" is no proof either.
        log.warning("membership check refused: %r", exc.__cause__ or exc)
        return False
    return bool(client._coordinator.generation == generation)
