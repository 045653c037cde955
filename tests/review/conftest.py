"""Fixture factories of the review tests: ``loopline review`` processes."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.settings import Settings
from tests.conftest import CliProcess, process_factory, wait_for


@dataclass
class ReviewProcess(CliProcess):
    args: tuple[str, ...] = ("review",)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.review_port}"

    def ready(self) -> bool:
        """/readyz says 200 "ready" once the queue is loaded (503 "loading" before); /healthz
        answers 200 throughout, "loading" then "ok"."""
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                ready = response.status == 200 and response.read() == b"ready"
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return ready and response.read() == b"ok"
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False  # a 503 is an HTTPError, a URLError

    def start(self) -> ReviewProcess:
        self.launch()
        wait_for(lambda: self.exited() or self.ready(), 60, f"the review page ({self.log_path})")
        assert not self.exited(), self.log_tail()
        return self


@pytest.fixture
def start_review(tmp_path: Path) -> Iterator[Callable[[Settings], ReviewProcess]]:
    yield from process_factory(tmp_path, "review", ReviewProcess, signal.SIGTERM)
