"""The throughput benchmark's own logic: when it looks at the workers, and its profile summary."""

import os
import time

from bench.throughput import bracketed, cpu_seconds, hottest, poll_seconds

# Three stacks, 10 samples: run->main->decode x6, run->main->apply x3, run->idle x1.
COLLAPSED = """\
run (bench/x.py:1);main (pipeline/a.py:5);decode (pipeline/codec.py:144) 6
run (bench/x.py:1);main (pipeline/a.py:7);apply (agents/ingest.py:90) 3

run (bench/x.py:2);idle (asyncio/base_events.py:1) 1
"""


def test_hottest_shares_inclusive_and_self() -> None:
    total, inclusive, own = hottest(COLLAPSED, top=3)
    assert total == 10
    # run holds all 10 samples (>= 90 %): left out. main 9/10 is at 90 %: left out too.
    assert inclusive == [
        (0.6, "decode (pipeline/codec.py)"),
        (0.3, "apply (agents/ingest.py)"),
        (0.1, "idle (asyncio/base_events.py)"),
    ]
    assert own == inclusive  # every sample's innermost frame is a leaf here


def test_hottest_counts_a_recursive_frame_once_per_stack() -> None:
    total, inclusive, own = hottest("f (a/m.py:1);f (a/m.py:2);g (a/m.py:3) 4\nh (a/m.py:9) 6\n")
    assert total == 10
    assert inclusive == [(0.6, "h (a/m.py)"), (0.4, "f (a/m.py)"), (0.4, "g (a/m.py)")]
    assert own == [(0.6, "h (a/m.py)"), (0.4, "g (a/m.py)")]


def test_hottest_of_nothing() -> None:
    assert hottest("") == (0, [], [])


def test_poll_seconds_halves_the_time_left() -> None:
    # 1,000,000 events at 10,000/s: 100 s left at the start -> capped at 5 s;
    # 6 s left at 940,000 -> 3 s; 0.1 s left -> 0.1 s (the floor, not 0.05).
    assert poll_seconds(0, 1_000_000, 10_000.0) == 5.0
    assert poll_seconds(940_000, 1_000_000, 10_000.0) == 3.0
    assert poll_seconds(999_000, 1_000_000, 10_000.0) == 0.1
    assert poll_seconds(0, 1_000_000, 0.0) == 5.0  # no rate yet


def test_cpu_seconds_reads_the_process_time_of_a_process() -> None:
    # This process, busy for a while: /proc's user + system ticks (10 ms) against Python's own.
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    before = time.process_time()
    measured = cpu_seconds(os.getpid())
    after = time.process_time()
    assert before - 0.02 <= measured <= after + 0.02
    assert measured >= 0.3


def test_baseline_passes_bracketing_the_worker_count_as_one() -> None:
    # 40,000 and 20,000 events/s over the same N: N/40,000 + N/20,000 seconds for 2 N events
    # is 26,667 events/s (not the mean rate, 30,000); CPU per event is the plain mean.
    rate, cpu = bracketed([(40_000.0, 20e-6), (20_000.0, 30e-6)])
    assert round(rate, 3) == round(2 / (1 / 40_000 + 1 / 20_000), 3) == 26_666.667
    assert cpu == 25e-6
    assert bracketed([(35_000.0, 1e-5)]) == (35_000.0, 1e-5)
