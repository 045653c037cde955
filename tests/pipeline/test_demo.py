"""The main command: `loopline demo` runs every part, and Ctrl-C stops them all cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.demo import _restoring, empty_earlier_demo
from pipeline.kafka_local import LocalBroker
from pipeline.settings import Settings
from pipeline.status import read_status
from tests.conftest import free_broker_port, free_port, settings_env, wait_for


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.broker
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
    # the very end of its clean-up, so that ran to its end. Nor did it empty it.
    assert "kafka left running" in text
    assert f"kafka is already up at {settings.bootstrap_servers}: its topics and state" in text


def _demo(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--duration", "6", "--rate", "200", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


def _published_inputs(log: str, settings: Settings) -> int:
    found = re.search(rf"^{re.escape(settings.topic('inputs'))}\s+([\d,]+)\s", log, re.M)
    assert found, log
    return int(found.group(1).replace(",", ""))


@pytest.mark.broker
def test_a_second_demo_starts_from_an_empty_broker(
    make_settings: Callable[..., Settings],
) -> None:
    """An earlier run's drifted inputs and spent candidate budget would show in the next."""
    port = free_broker_port()
    settings = make_settings(bootstrap_servers=f"127.0.0.1:{port}", review_port=free_port())
    broker = LocalBroker(settings.kafka_home, port)
    try:
        first = _demo(settings)
        assert "emptied" not in first and "kafka stopped" in first
        assert broker.demo_marker.exists()
        second = _demo(settings, "--keep-kafka")  # left up, to count what its topics hold
        assert "emptied the demo's broker of earlier runs (--keep-state keeps them)" in second
        published = _published_inputs(second, settings)
        held = {t.name: t.records for t in asyncio.run(read_status(settings)).topics}
        assert held[settings.topic("inputs")] == published  # the second run's only
    finally:
        broker.down()
        shutil.rmtree(broker.instance_dir, ignore_errors=True)


def _broker_in(tmp_path: Path, data: bool, made_by_demo: bool) -> LocalBroker:
    broker = LocalBroker(tmp_path, 1)  # never started: only its folder is looked at
    if data:
        (broker.instance_dir / "data").mkdir(parents=True)
    if made_by_demo:
        broker.own(demo=True)
    return broker


def test_the_demo_empties_only_a_broker_whose_data_an_earlier_demo_made(tmp_path: Path) -> None:
    fresh = _broker_in(tmp_path / "fresh", data=False, made_by_demo=False)
    assert empty_earlier_demo(fresh, keep_state=False) == (None, True)

    demo = _broker_in(tmp_path / "demo", data=True, made_by_demo=True)
    note, owned = empty_earlier_demo(demo, keep_state=False)
    assert (note, owned) == (
        "emptied the demo's broker of earlier runs (--keep-state keeps them)",
        True,
    )
    assert not demo.has_data and not demo.demo_marker.exists()  # marked again once it is up

    kept = _broker_in(tmp_path / "kept", data=True, made_by_demo=True)
    note, owned = empty_earlier_demo(kept, keep_state=True)
    assert note == "kept the topics and state of earlier runs (--keep-state): they count below"
    assert not owned and kept.has_data and kept.demo_marker.exists()

    yours = _broker_in(tmp_path / "yours", data=True, made_by_demo=False)
    note, owned = empty_earlier_demo(yours, keep_state=False)
    assert note is not None and note.startswith(f"kept the data of {yours.instance_dir}: ")
    assert "'loopline kafka wipe' empties it" in note
    assert not owned and yours.has_data


def test_the_wait_for_the_worker_says_when_it_is_restoring_its_state() -> None:
    restoring = "loopline_restore_remaining_records 12345.0\n"
    assert _restoring(restoring) == " (restoring its state: 12,345 changelog records to go)"
    assert _restoring("loopline_restore_remaining_records 0.0\n") == ""  # restored
    assert _restoring(None) == ""  # /metrics not answering yet
