"""The scaling timeline of one TE start (paper Table 2, Figure 8): five steps, each with its start and end.

    SCALER_PRE    the scale decision → a process exists to hold the TE (spawned, or a pre-warmed one taken)
    TE_PRE_LOAD   imports, engine init without the model
    TE_LOAD       weights into the TE (from a DRAM hit, a DRAM miss, or forked from a running TE)
    TE_POST_LOAD  KV pool allocation, warm-up
    SCALER_POST   TE ready → a JE sends it its first request (the TE list is pushed, never polled)

Who stamps what: the CM the two scaler steps, the TE its three steps (with its own wall clock — the same
host's, so stamps compare; across hosts the CM keeps only the TE's durations). Pure: a msgspec record the TE
sends with its heartbeat and the CM stores, reports in /v1/cluster and observes into histograms.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

__all__ = ["LoadSource", "ScalingStep", "StartTimeline", "StepSpan"]


class ScalingStep(StrEnum):
    SCALER_PRE = "scaler_pre"
    TE_PRE_LOAD = "te_pre_load"
    TE_LOAD = "te_load"
    TE_POST_LOAD = "te_post_load"
    SCALER_POST = "scaler_post"


STEP_ORDER = tuple(ScalingStep)


class LoadSource(StrEnum):
    DRAM_HIT = "dram_hit"  # the weight files were (almost) all in the page cache
    DRAM_MISS = "dram_miss"  # read from storage
    FORK = "fork"  # received from a running TE over DistFlow
    UNKNOWN = "unknown"


class StepSpan(msgspec.Struct, frozen=True, array_like=True):
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


class StartTimeline(msgspec.Struct, kw_only=True):
    """One TE start. Steps are recorded as they end; a step never recorded stays absent."""

    te_id: str
    incarnation: int
    prewarmed: bool = False  # the process was taken from the pre-warmed pool (its TE_PRE_LOAD was earlier)
    load_source: LoadSource = LoadSource.UNKNOWN
    steps: dict[ScalingStep, StepSpan] = msgspec.field(default_factory=dict)

    def record(self, step: ScalingStep, start: float, end: float) -> None:
        if end < start:
            raise ValueError(f"{step}: ends at {end} before it starts at {start}")
        self.steps[step] = StepSpan(start, end)

    def seconds(self, step: ScalingStep) -> float | None:
        span = self.steps.get(step)
        return None if span is None else span.seconds

    @property
    def complete(self) -> bool:
        return all(s in self.steps for s in STEP_ORDER)

    def total_seconds(self) -> float | None:
        """From the scale decision to the first request, when both ends are known."""
        first, last = self.steps.get(ScalingStep.SCALER_PRE), self.steps.get(ScalingStep.SCALER_POST)
        if first is None or last is None:
            return None
        return max(0.0, last.end - first.start)

    def report(self) -> dict[str, object]:
        return {
            "te_id": self.te_id,
            "incarnation": self.incarnation,
            "prewarmed": self.prewarmed,
            "load_source": str(self.load_source),
            "steps_s": {str(s): round(self.steps[s].seconds, 4) for s in STEP_ORDER if s in self.steps},
            "total_s": None if (t := self.total_seconds()) is None else round(t, 4),
        }
