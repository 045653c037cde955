"""bench/faust_only.py against the real broker: the worker's Faust set-up reads every event of
the source topics once, in each mode, and reports it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bench.throughput import faust_only, publish
from pipeline.settings import Settings
from tests.conftest import settings_env


@pytest.mark.parametrize("mode", ["consume", "decode"])
def test_faust_only_handles_every_source_event_once(
    make_settings: Callable[..., Settings], mode: str
) -> None:
    settings = make_settings()
    asyncio.run(publish(settings, 500))  # generated events over the three source topics
    result = faust_only(mode, 500, settings_env(settings))
    assert result["mode"] == mode and result["events"] == 500
    assert result["events_per_s"] > 0
