"""Time-windowed averages over samples stamped by the caller's clock (pure: no clock of its own)."""

from __future__ import annotations

from collections import deque

__all__ = ["WindowedAverage"]


class WindowedAverage:
    """The mean of the samples of the last `horizon_s` seconds, each weighted by how long it held.

    Samples arrive at irregular times (a TE reports when it steps, and at least every second), so a plain
    mean would over-weight bursts of reports. Each sample holds until the next one; the newest holds until
    `now`. Memory is bounded by the samples inside the horizon (older ones are dropped as time moves).
    """

    def __init__(self, horizon_s: float) -> None:
        if horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float]] = deque()  # (time, value), increasing time

    def add(self, now: float, value: float) -> None:
        if self._samples and now < self._samples[-1][0]:
            raise ValueError(f"sample at {now} is older than the last one at {self._samples[-1][0]}")
        self._samples.append((now, value))
        self._trim(now)

    def _trim(self, now: float) -> None:
        start = now - self.horizon_s
        # Keep the last sample at or before the window's start: it holds into the window.
        while len(self._samples) >= 2 and self._samples[1][0] <= start:
            self._samples.popleft()

    def covered_s(self, now: float) -> float:
        """How much of the horizon the samples cover (a window just started covers less)."""
        if not self._samples:
            return 0.0
        return min(self.horizon_s, max(0.0, now - self._samples[0][0]))

    def mean(self, now: float) -> float | None:
        """Time-weighted mean over [now − horizon, now]; None without samples; the last value if no time
        has passed since the first sample."""
        if not self._samples:
            return None
        self._trim(now)
        start = now - self.horizon_s
        total = weight = 0.0
        samples = list(self._samples)
        for i, (t, v) in enumerate(samples):
            t0 = max(t, start)
            t1 = samples[i + 1][0] if i + 1 < len(samples) else now
            if t1 > t0:
                total += v * (t1 - t0)
                weight += t1 - t0
        if weight == 0.0:
            return samples[-1][1]
        return total / weight

    def max(self, now: float) -> float | None:
        if not self._samples:
            return None
        self._trim(now)
        start = now - self.horizon_s
        samples = list(self._samples)
        return max(
            v for i, (t, v) in enumerate(samples) if i + 1 == len(samples) or samples[i + 1][0] > start
        )
