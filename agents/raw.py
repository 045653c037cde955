"""Topics whose messages reach the agents as the bytes Kafka delivered.

The agents decode every record themselves (Avro with the codec, JSON with pipeline.fastjson),
so Faust's serializer registry has nothing to do for them; passing each key and value through
it (the "raw" codec) still cost about 4 % of the worker's time in bench/throughput.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import AppT, Message


class RawSchema(faust.Schema[Any, Any]):
    """Keys and values as bytes, untouched (None stays None: a tombstone)."""

    def loads_key(self, app: AppT, message: Message, **_: Any) -> Any:
        return message.key

    def loads_value(self, app: AppT, message: Message, **_: Any) -> Any:
        return message.value


def raw_topic(app: faust.App, *names: str) -> Any:
    """A topic of ``names`` with raw keys and values, for consuming and for sending."""
    return app.topic(*names, schema=RawSchema(key_serializer="raw", value_serializer="raw"))
