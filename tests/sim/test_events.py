"""The discrete-event core: time order, FIFO among equal times, no events in the past."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepflow.sim.events import EventLoop, VirtualClock


def test_events_run_in_time_order_then_fifo() -> None:
    loop = EventLoop()
    seen: list[tuple[float, str]] = []
    for t, name in [(2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b"), (0.5, "first")]:
        loop.at(t, lambda t=t, name=name: seen.append((loop.now, name)))
    loop.run()
    assert seen == [(0.5, "first"), (1.0, "a"), (1.0, "b"), (2.0, "c"), (2.0, "d")]
    assert loop.num_events == 5 and len(loop) == 0


def test_events_may_schedule_events_and_run_until_stops() -> None:
    loop = EventLoop(VirtualClock(10.0))
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(loop.now)
        loop.after(1.0, tick)

    loop.at(10.0, tick)
    loop.run(until=13.5)
    assert ticks == [10.0, 11.0, 12.0, 13.0]
    assert loop.now == 13.5 and loop.next_time() == 14.0
    with pytest.raises(ValueError, match="past"):
        loop.at(13.0, tick)


@given(st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.integers()), max_size=50))
def test_any_schedule_runs_sorted_by_time_and_insertion(events: list[tuple[float, int]]) -> None:
    loop = EventLoop()
    seen: list[int] = []
    for i, (t, _) in enumerate(events):
        loop.at(t, seen.append, i)
    loop.run()
    assert seen == sorted(range(len(events)), key=lambda i: (events[i][0], i))
