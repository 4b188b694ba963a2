"""The simulator's discrete-event core: a virtual clock and a heap of timed events. No sleeps, no threads.

Events run in time order; events at the same time run in the order they were scheduled (a sequence number
breaks ties), so a run is a pure function of its inputs and its seed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["EventLoop", "VirtualClock"]


class VirtualClock:
    """Seconds of simulated time; callable, so it is what a `Scheduler` or an RTC takes as `clock`."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class EventLoop:
    """`at(t, fn, *args)` schedules `fn(*args)` at simulated time `t`; `run(until)` executes events in order,
    advancing the clock to each event's time. An event may schedule others (never in the past)."""

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock or VirtualClock()
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.num_events = 0  # executed so far

    @property
    def now(self) -> float:
        return self.clock.now

    def at(self, time: float, fn: Callable[..., Any], *args: Any) -> None:
        if time < self.clock.now:
            raise ValueError(f"event at {time} is in the past (now {self.clock.now})")
        heapq.heappush(self._heap, (time, next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.clock.now + max(delay, 0.0), fn, *args)

    def __len__(self) -> int:
        return len(self._heap)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run(self, until: float | None = None) -> None:
        """Execute events until none is left, or until the next one is later than `until` (the clock then
        stands at `until`)."""
        heap, clock, pop = self._heap, self.clock, heapq.heappop
        count = 0
        while heap:
            if until is not None and heap[0][0] > until:
                break
            time, _, fn, args = pop(heap)
            clock.now = time
            fn(*args)
            count += 1
        self.num_events += count
        if until is not None and clock.now < until:
            clock.now = until
