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
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import pytest

from pipeline.core import to_ms
from pipeline.demo import (
    DemoTraffic,
    _restoring,
    alert_lines,
    empty_earlier_demo,
    empty_earlier_demo_archive,
)
from pipeline.generator import eval_set
from pipeline.kafka_local import LocalBroker
from pipeline.processor import Processor
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


def _demo(settings: Settings, *args: str, speedup: str = "60") -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "demo",
            *("--duration", "8", "--rate", "400", "--speedup", speedup),
            *args,
        ],
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
        # 53 min of event time: the drift alert fires some minutes after the onset, half-way
        first = _demo(settings, speedup="400")
        assert "emptied" not in first and "kafka stopped" in first
        assert broker.demo_marker.exists()
        fired = re.findall(r"^  \d\d:\d\d FIRING +\w+ +drift +([\w-]+): ", first, re.M)
        assert sorted(fired) == ["kyc-review", "refunds", "support-triage"], first
        assert f"archive {settings.archive_file} (this run's rows), v_weekly_scorecard:" in first
        # in real time, 8 s of event time: no alert evaluation, nor the first run's alerts
        second = _demo(settings, "--keep-kafka", speedup="1")  # left up, to count its topics
        assert "emptied the demo's broker of earlier runs (--keep-state keeps them)" in second
        assert f"alerts on {settings.topic('alerts')}: none" in second
        # nor do the first run's episodes, which no alert state is left to resolve, stay in the
        # archive 'still firing' for good
        assert "emptied the demo's archive of earlier runs" in second
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "query", "--format", "csv",
             "SELECT count(*) AS episodes FROM v_alert_episodes"],
            env=settings_env(settings), capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert done.stdout.split() == ["episodes", "0"]
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


def test_the_demo_empties_only_an_archive_whose_rows_earlier_demos_wrote(tmp_path: Path) -> None:
    archive = tmp_path / "archive.duckdb"
    marker = tmp_path / "archive.duckdb.made-by-demo"
    # none yet, the demo's broker empty: the sink makes it, the demo's
    assert empty_earlier_demo_archive(archive, True, True) == (None, True)
    assert marker.exists()

    archive.write_text("rows")
    (tmp_path / "archive.duckdb.wal").write_text("log")
    # the broker kept (--keep-state, or already up): so is its archive
    assert empty_earlier_demo_archive(archive, True, False) == (None, True)
    assert archive.exists() and marker.exists()
    # the broker emptied: its archive with it, and marked again for the rows to come
    note = "emptied the demo's archive of earlier runs"
    assert empty_earlier_demo_archive(archive, True, True) == (note, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive.duckdb.made-by-demo"]

    # an archive 'loopline archive run' wrote to is kept, and does not become the demo's
    marker.unlink()
    archive.write_text("yours")
    note, owned = empty_earlier_demo_archive(archive, True, True)
    assert note is not None and note.startswith(f"kept the archive {archive}: no demo is known")
    assert "delete the file to start afresh" in note
    assert not owned and archive.read_text() == "yours" and not marker.exists()
    assert empty_earlier_demo_archive(archive, True, False) == (None, False)
    # nor is any archive touched when the broker is not the demo's
    marker.write_text("")
    assert empty_earlier_demo_archive(archive, False, True) == (None, False)
    assert archive.read_text() == "yours"


def test_the_wait_for_the_worker_says_when_it_is_restoring_its_state() -> None:
    restoring = "loopline_restore_remaining_records 12345.0\n"
    assert _restoring(restoring) == " (restoring its state: 12,345 changelog records to go)"
    assert _restoring("loopline_restore_remaining_records 0.0\n") == ""  # restored
    assert _restoring(None) == ""  # /metrics not answering yet


def test_the_demo_traffic_spans_its_event_time_ending_when_it_starts() -> None:
    """30 s at 60x: 30 min of event time up to the start of the run, so the last events,
    published 30 s after it, are not ahead of their messages (the workers refuse those)."""
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    traffic = DemoTraffic(duration=30, rate=500, speedup=60)
    assert traffic.span_seconds == 1800
    for seed in (1, 2, 3):
        stamps = [record["ts"] for _, record in islice(traffic.events(now, seed), 15_000)]
        assert stamps == sorted(stamps)
        # 500 events a second of the clock, at 2.2095 a case, are 3.77 cases a second of
        # event time: the 15,000 end within a minute of now
        assert to_ms(now - timedelta(minutes=30)) <= stamps[0] < to_ms(now - timedelta(minutes=29))
        assert abs(stamps[-1] - to_ms(now)) < 60_000


@pytest.mark.parametrize("seed", [1, 2])
def test_the_demo_traffic_fires_the_drift_alert_of_every_loop_after_the_onset(seed: int) -> None:
    """What the demo is for: its traffic (replayed here, the workers' code) drifts half-way,
    and each loop's drift alert fires in the minutes after, with nothing before."""
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    traffic = DemoTraffic(duration=30, rate=500)
    onset_ms = to_ms(now) - 900_000  # half-way through the 30 min of event time
    processor = Processor()
    for record in eval_set(1, now):
        processor.process("eval-cases", record)
    for topic, record in islice(traffic.events(now, seed), 15_000):
        processor.process(topic, record)
    fired = {a["loop"]: a["started_at"] for a in processor.alerts if a["state"] == "FIRING"}
    assert [a["rule"] for a in processor.alerts] == ["drift"] * 3
    assert sorted(fired) == ["kyc-review", "refunds", "support-triage"]
    # three evaluations in a row (a minute apart) after the onset, within the 15 min after it
    assert all(
        onset_ms + 3 * 60_000 <= started < onset_ms + 15 * 60_000 for started in fired.values()
    )


def test_the_demo_lists_alerts_oldest_first_at_their_event_time() -> None:
    def alert(ts: datetime, state: str, loop: str) -> dict[str, object]:
        return {
            "ts": ts,
            "fingerprint": f"drift/{loop}",
            "state": state,
            "severity": "WARNING",
            "rule": "drift",
            "summary": f"{loop}: 5 of 9 features drifted",
        }

    at = datetime(2026, 11, 29, 11, 52, 30, tzinfo=UTC)
    records = [
        alert(at + timedelta(minutes=3), "RESOLVED", "refunds"),
        alert(at, "FIRING", "refunds"),
        alert(at, "FIRING", "kyc-review"),
    ]
    assert alert_lines("loopline.alerts", records, unreadable=1) == (
        "alerts on loopline.alerts (event time, UTC; one FIRING and one RESOLVED an episode) "
        "(1 records unreadable):\n"
        "  11:52 FIRING   WARNING  drift           kyc-review: 5 of 9 features drifted\n"
        "  11:52 FIRING   WARNING  drift           refunds: 5 of 9 features drifted\n"
        "  11:55 RESOLVED WARNING  drift           refunds: 5 of 9 features drifted"
    )
    assert alert_lines("loopline.alerts", []) == "alerts on loopline.alerts: none"
    many = [alert(at + timedelta(minutes=n), "FIRING", f"loop-{n:02d}") for n in range(25)]
    listed = alert_lines("loopline.alerts", many).splitlines()
    assert listed[0].endswith("an episode) (the last 20 of 25):")
    assert [line.split()[4] for line in listed[1:]] == [f"loop-{n:02d}:" for n in range(5, 25)]
