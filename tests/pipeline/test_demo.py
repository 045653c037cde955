"""The main command: `loopline demo` runs every part, and Ctrl-C stops them all cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.demo import _restoring
from pipeline.settings import Settings
from tests.conftest import free_port, settings_env, wait_for

pytestmark = pytest.mark.broker


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGINT],  # Ctrl-C
        [signal.SIGINT, signal.SIGINT],  # Ctrl-C again while it stops
        [signal.SIGTERM],  # a supervisor, or `timeout`
    ],
    ids=["ctrl-c", "ctrl-c-twice", "sigterm"],
)
def test_ctrl_c_stops_every_process_the_demo_started(
    make_settings: Callable[..., Settings], tmp_path: Path, signals: list[signal.Signals]
) -> None:
    settings = make_settings(review_port=free_port())
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "demo", "--duration", "120", "--rate", "200"],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    try:
        wait_for(lambda: "generating" in log_path.read_text(), 120, f"the demo ({log_path})")
        time.sleep(5)
        text = log_path.read_text()
        pids = [int(p) for p in re.findall(r"started \(pid (\d+)", text)]
        assert len(pids) == 3, text  # the worker, the archive sink, the review page
        for n, sig in enumerate(signals):
            if n:  # again while the demo stops its processes
                wait_for(lambda: "stopping what" in log_path.read_text(), 60, "the clean-up")
            os.killpg(demo.pid, sig)  # what Ctrl-C does: the whole foreground job
        assert demo.wait(timeout=120) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "interrupted: everything the demo started is stopped" in text
    assert not [pid for pid in pids if _alive(pid)]
    # The broker was the tests' own (already up), so the demo leaves it running: it says so at
    # the very end of its clean-up, so that ran to its end.
    assert "kafka left running" in text


def test_the_wait_for_the_worker_says_when_it_is_restoring_its_state() -> None:
    restoring = "loopline_restore_remaining_records 12345.0\n"
    assert _restoring(restoring) == " (restoring its state: 12,345 changelog records to go)"
    assert _restoring("loopline_restore_remaining_records 0.0\n") == ""  # restored
    assert _restoring(None) == ""  # /metrics not answering yet
