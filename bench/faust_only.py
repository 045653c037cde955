"""What a worker built like loopline's can reach here at most: the worker's Faust app and
consumer set-up (pipeline.app.faust_app, agents.fetch, agents.batches, pipeline.worker.run_app)
with a batch handler that does no more than ``consume`` (count the records) or ``decode``
(decode each record too, as the baseline does). bench/throughput runs both after the worker,
so that the worker's ratio can be read against what its set-up alone allows on the same
machine and events.

``faust_only.py MODE N`` reads the LOOPLINE_* settings, handles N messages of the source topics
(from the earliest offset, in a consumer group of its own), prints one JSON line with its rate
(from its first batch to its N-th message, as the bench times the worker) and stops.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import faust

from agents.batches import batch_topic, consume
from agents.fence import Fence, StallWatch
from pipeline.app import faust_app
from pipeline.codec import Codec
from pipeline.settings import Settings
from pipeline.topics import SOURCE_TOPICS
from pipeline.worker import run_app

MODES = ("consume", "decode")


class Handler:
    """Counts (and with ``decode``, decodes) every message of the batches it is handed."""

    def __init__(self, mode: str, count: int) -> None:
        self.mode = mode
        self.count = count
        self.decode = Codec.load().decode if mode == "decode" else None
        self.seen = 0
        self.started: float | None = None
        self.reported = False

    async def handle(self, by_partition: dict[int, list[Any]]) -> None:
        if self.started is None:
            self.started = time.monotonic()
        decode = self.decode
        for messages in by_partition.values():
            if decode is not None:
                for message in messages:
                    decode(message.value)
            self.seen += len(messages)
        if self.seen >= self.count and not self.reported:  # batches may come while it stops
            self.reported = True
            rate = self.seen / (time.monotonic() - self.started)
            print(json.dumps({"mode": self.mode, "events": self.seen, "events_per_s": round(rate)}))
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own shutdown


def faust_only_app(settings: Settings, handler: Handler) -> faust.App:
    app = faust_app(settings)
    topic = batch_topic(app, *map(settings.topic, SOURCE_TOPICS))
    consume(app, topic, handler.handle, "faust-only", Fence(app, StallWatch(5.0)))
    return app


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in MODES or not sys.argv[2].isdigit():
        raise SystemExit(f"usage: faust_only.py {{{','.join(MODES)}}} N")
    settings = Settings.from_env()
    handler = Handler(sys.argv[1], int(sys.argv[2]))
    run_app(settings, lambda s: faust_only_app(s, handler))


if __name__ == "__main__":
    main()
