"""The routed-load estimate: a TE's last reported load, raised by what was routed to it since.

A TE reports its load with its outputs (`SchedulerStats`); between two reports the JE keeps routing. Without
an estimate a burst of arrivals would all see the same "least loaded" TE, so each request routed to a TE adds
the work it brings (the prompt tokens the TE will not find cached, plus its output budget) until the TE's next
report, which already counts it. Pure: the JE's routing client and the simulator share it.
"""

from __future__ import annotations

from typing import Protocol

from deepflow.platform.je.policies.types import TELoad

__all__ = ["ReportedLoad", "estimated_load", "routed_tokens"]


class ReportedLoad(Protocol):
    """The fields of a TE's report (`SchedulerStats`) the estimate reads."""

    num_running: int
    num_waiting: int
    outstanding_tokens: int
    kv_cache_usage: float


def routed_tokens(prompt_len: int, matched_tokens: int, max_tokens: int | None) -> int:
    """Work a request brings to its TE until the TE's next report: what it will not find cached (at least
    one token), plus its output budget."""
    return max(1, prompt_len - matched_tokens) + (max_tokens or 0)


def estimated_load(te_id: str, report: ReportedLoad | None, routed: int, healthy: bool) -> TELoad:
    """`te_id`'s load as a policy sees it: its last `report` (none yet: idle) plus `routed` tokens routed to
    it since, counted as one more waiting request while there are any."""
    r = report
    return TELoad(
        te_id=te_id,
        num_running=r.num_running if r else 0,
        num_waiting=(r.num_waiting if r else 0) + (1 if routed else 0),
        outstanding_tokens=(r.outstanding_tokens if r else 0) + routed,
        kv_usage=r.kv_cache_usage if r else 0.0,
        healthy=healthy,
    )
