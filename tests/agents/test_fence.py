"""The stall watch behind the fence (agents.fence): pure, with a clock the test moves."""

from __future__ import annotations

from agents.fence import StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_gap_in_the_ticks_is_a_stall_whether_a_tick_or_a_look_finds_it() -> None:
    clock = Clock()
    watch = StallWatch(5.0, clock)
    for _ in range(20):  # ticking every half second: no stall
        clock.now += 0.5
        watch.tick()
    assert not watch.stalled_since(0.0)

    # Stopped for 20 s; the handler looks before the loop's next tick.
    checked = clock.now
    clock.now += 20.0
    assert watch.stalled_since(checked)
    assert not watch.stalled_since(clock.now)  # checked since: nothing new

    # Stopped again; this time the tick comes first, and the handler still finds the stall.
    checked = clock.now
    clock.now += 6.0
    watch.tick()
    clock.now += 0.1
    assert watch.stalled_since(checked)


def test_a_gap_of_the_threshold_or_less_is_no_stall() -> None:
    clock = Clock()
    watch = StallWatch(5.0, clock)
    checked = clock.now
    clock.now += 5.0
    watch.tick()
    assert not watch.stalled_since(checked)
