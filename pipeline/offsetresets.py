"""Records a consumer's offset reset skipped, said and counted.

When a partition's fetch offset is no longer in its log, aiokafka resets it (to the earliest
offset: loopline's consumers all say ``earliest``) and says so at INFO only. Records Kafka
deleted unread (retention, or a delete-records request) are then events counted nowhere, and
an offset past the log's end (a topic made anew) means records read again: both are said here,
with the offsets, and a loss is counted (``on_deleted``: the worker's
loopline_records_deleted_unread_total).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

log = logging.getLogger(__name__)

FETCHER_LOGGER = "aiokafka.consumer.fetcher"
#: What aiokafka's fetcher logs (at INFO, its only message at that level) before it resets a
#: partition's fetch offset. Said nowhere else.
RESET_MESSAGE = "Fetch offset %s is out of range for partition %s, resetting offset"


#: The next offset of a topic's partition that a process's checkpointed state has not applied
#: (None: no checkpoint of it). Called in the Kafka client's thread.
AppliedOffset = Callable[[str, int], int | None]


class OffsetResets:
    """A logging filter on aiokafka's fetcher notes each reset and the offset it could not
    fetch; the first record the client hands over after it (``fetched``, in the thread the
    client runs in, as the filter is) tells where the reset went: further on, those between
    were deleted unread; before it, records are read again (copies within the dedupe horizon
    count once, and the archive writes each event once).

    A consumer whose state checkpoints its own offsets (the worker's, pipeline.checkpoint)
    resumes from its group's committed offset, which can be behind the checkpoint (a crash, or
    a stop before the last batch was acked): the records between were counted, so only those
    past what ``applied`` says were lost."""

    def __init__(
        self,
        on_deleted: Callable[[str, int], None] | None = None,
        applied: AppliedOffset | None = None,
    ) -> None:
        self.on_deleted = on_deleted  # called with the topic and how many records
        self.applied = applied
        self.reset_from: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset

    def listen(self) -> None:
        """Hear aiokafka's fetcher, at INFO whatever the log level (else it never logs it)."""
        fetcher_log = logging.getLogger(FETCHER_LOGGER)
        if not fetcher_log.isEnabledFor(logging.INFO):
            fetcher_log.setLevel(logging.INFO)
        fetcher_log.addFilter(self)

    def close(self) -> None:
        logging.getLogger(FETCHER_LOGGER).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        """Note a reset (and drop aiokafka's line: ``fetched`` says more); pass the rest."""
        if record.msg != RESET_MESSAGE or not isinstance(record.args, tuple):
            return True
        offset, tp = cast(tuple[int, Any], record.args)
        self.reset_from[(tp.topic, tp.partition)] = offset
        return False

    def forget(self, tps: Iterable[tuple[str, int]]) -> None:
        """Partitions revoked: a reset noted before their next record is no longer this
        consumer's to say (back, they are read from the committed offset; further on than
        the reset, a stale note would count the records between as lost)."""
        for topic, partition in tps:  # (topic, partition) pairs, or Kafka's named tuples
            self.reset_from.pop((topic, partition), None)

    def _applied(self, tp: Any) -> int | None:
        """``applied``'s offset; None if it has none or fails (this runs in the Kafka client's
        fetch: an error must not stop the consumer, and the loss is then counted from the
        reset, as if no state had applied any)."""
        if self.applied is None:
            return None
        try:
            return self.applied(tp.topic, tp.partition)
        except Exception:
            log.exception("%s[%d]: the state's checkpointed offset is unreadable", *tp)
            return None

    def fetched(self, tp: Any, first_offset: int) -> None:
        if not self.reset_from:
            return
        start = self.reset_from.pop((tp.topic, tp.partition), None)
        if start is None or first_offset == start:
            return
        if first_offset > start:
            applied = self._applied(tp)
            unread = start if applied is None else max(start, applied)
            if first_offset <= unread:
                log.info(
                    "%s[%d]: the records Kafka deleted up to offset %d had all been applied "
                    "(the committed offset %d was behind the checkpoint); reading on",
                    tp.topic,
                    tp.partition,
                    first_offset - 1,
                    start,
                )
                return
            log.warning(
                "%s[%d]: %d records (offsets %d-%d) were deleted by Kafka before this process "
                "read them (retention, or records deleted): their events are counted nowhere; "
                "reading on from offset %d",
                tp.topic,
                tp.partition,
                first_offset - unread,
                unread,
                first_offset - 1,
                first_offset,
            )
            if self.on_deleted is not None:
                self.on_deleted(tp.topic, first_offset - unread)
        else:
            log.warning(
                "%s[%d]: offset %d is past the partition's end (the topic made anew, or its log "
                "cut back): reading again from offset %d; copies within the dedupe horizon "
                "count once",
                tp.topic,
                tp.partition,
                start,
                first_offset,
            )
