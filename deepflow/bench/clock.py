"""The clock the load generator measures and waits with: `now()`, `sleep(s)` and `sleep_until(t)`.

Every time the benchmark takes (request start, first chunk, each chunk, end to end, run duration) and every
wait it makes (open-loop arrivals) goes through one `Clock`, so a test can run the benchmark and a fake
server on one virtual clock and check latencies exactly. The default, `SystemClock`, is what a real run
uses: `time.perf_counter()` and `asyncio.sleep`.

Request timeouts use `asyncio.timeout`, i.e. the event loop's own clock: a virtual clock must therefore be
the loop's clock (`LoopClock` on a loop whose `time()` is virtual), so that timeouts follow it too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "LoopClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Seconds on an arbitrary origin; only differences of `now()` are meaningful."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None:
        """Return `seconds` after the call (at once when `seconds` <= 0)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once `now() >= deadline` (at once when it already is)."""
        ...


class SystemClock:
    """Real time: `time.perf_counter()` (the finest monotonic clock) and `asyncio.sleep`."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


class LoopClock:
    """The running event loop's clock (`loop.time()`), virtual when the loop's time is."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


SYSTEM_CLOCK = SystemClock()  # stateless: one instance serves every run
