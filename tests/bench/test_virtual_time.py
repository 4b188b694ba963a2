"""The virtual-time loop the e2e tests run on: timers fire at their exact deadlines, in no wall time."""

from __future__ import annotations

import asyncio
import threading

from deepflow.bench.clock import Clock, LoopClock, SystemClock
from tests.bench.virtual_time import run_virtual


def test_time_jumps_to_each_timer_once_every_task_is_blocked() -> None:
    clock = LoopClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    async def main() -> None:
        assert clock.now() == 0.0
        await asyncio.gather(sleeper("b", 3600.0), sleeper("a", 0.25), clock.sleep_until(10.0))
        try:
            async with asyncio.timeout(0.5):  # timeouts run on the same (virtual) clock
                await clock.sleep(60.0)
        except TimeoutError:
            woke.append(("timeout", clock.now()))

    run_virtual(main())
    assert woke == [("a", 0.25), ("b", 3600.0), ("timeout", 3600.5)]


def test_time_stands_still_while_an_executor_job_runs() -> None:
    clock = LoopClock()
    release = threading.Event()

    async def main() -> tuple[float, float]:
        timer = asyncio.create_task(clock.sleep(1.0))  # pending: time may jump to it only after the job
        job = asyncio.to_thread(release.wait, 10)
        asyncio.get_running_loop().call_soon(release.set)  # the job ends once the loop runs
        assert await job
        during = clock.now()
        await timer
        return during, clock.now()

    assert run_virtual(main()) == (0.0, 1.0)


def test_both_clocks_are_clocks() -> None:
    assert isinstance(SystemClock(), Clock) and isinstance(LoopClock(), Clock)
    asyncio.run(SystemClock().sleep_until(float("-inf")))  # a past deadline returns at once
