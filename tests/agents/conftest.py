"""Fixtures of the agents' tests that need no broker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import faust
import pytest


@pytest.fixture
def app() -> Iterator[faust.App]:
    """A Faust app on its own event loop, never started: its topics, conductor, consumer and
    flow control work without a broker."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield faust.App("offline-test", broker="kafka://127.0.0.1:1", autodiscover=False, loop=loop)
    asyncio.set_event_loop(None)
    loop.close()
