"""An asyncio event loop whose clock is virtual: time jumps to the next timer once nothing can run.

`loop.time()` starts at 0 and moves only when the loop would otherwise wait: asyncio asks its selector to
block for `timeout` = (earliest timer) - now exactly when no callback is ready, i.e. when every task is
blocked. Our selector then polls I/O without blocking and, if nothing is there, advances the clock by
`timeout` instead of sleeping, so the earliest timer (an `asyncio.sleep`, an `asyncio.timeout`, a
`LoopClock.sleep_until`) fires at once, at its exact virtual deadline. Code that reads `LoopClock().now()`
measures that virtual time: a fake server sleeping 50 ms makes the client measure 50 ms, whatever the load
on the machine, in no wall time at all.

Virtual time is only sound while everything that can wake a task runs on this loop: in-memory queues and
futures. Two things do not, and the loop waits for them in real time instead of jumping:
- executor jobs (`asyncio.to_thread`, `run_in_executor`): while one is in flight, `select` blocks for real
  (a job's completion wakes the loop through its self-pipe);
- real sockets: data in flight in the kernel is invisible to a poll, so "nothing runnable" is undecidable.
  Route timed traffic in-process (`FakeOpenAIServer.transport()`); a socket used only from inside an
  executor job (the benchmark's synchronous `/tokenize` client) is fine, by the rule above.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualTimeLoop", "run_virtual"]

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Turns the loop's "wait `timeout` for I/O" into "poll, then jump the clock by `timeout`"."""

    def __init__(self, loop_state: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop_state = loop_state

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        state = self._loop_state
        # timeout 0: callbacks are ready; None: no timer at all (only I/O or a thread can wake the loop).
        if timeout is None or timeout <= 0 or state.jobs_in_flight:
            return super().select(timeout)
        events = super().select(0)
        if not events:
            state.virtual_now += timeout  # == the earliest timer's deadline (to a float rounding)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop on virtual time (see the module docstring)."""

    def __init__(self) -> None:
        self.virtual_now = 0.0
        self.jobs_in_flight = 0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.virtual_now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.jobs_in_flight += 1

        def done(_: asyncio.Future[T]) -> None:
            self.jobs_in_flight -= 1

        future.add_done_callback(done)  # runs on the loop, after the job's result reached it
        return future


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a fresh `VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
