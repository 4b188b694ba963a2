"""Which models the cluster manager keeps pre-loaded in DRAM (paper §6.2): pure, so it is unit-tested.

A TE that scales out loads its weights from the page cache (a DRAM hit) or from storage (a miss). DRAM is
finite, so the CM predicts which models will scale next and keeps those resident:

1. the operator's list (`ModelCandidate.pinned`), in the order given — an operator knows launches and
   daily peaks no trend shows;
2. then models whose load is rising (the short window's mean above the long window's: the same two windows
   the autoscaler scales on), steepest relative rise first;
3. then models at zero TEs that were busy recently (a scale from zero pays the whole load);

as many as fit in `budget_bytes`. Everything else may be evicted. Ties break by name (deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ModelCandidate", "choose_preload"]


@dataclass(frozen=True)
class ModelCandidate:
    model: str
    weight_bytes: int
    pinned: int | None = None  # position in the operator's pre-load list; None when not listed
    short_load: float = 0.0  # outstanding tokens, short (panic) window mean
    long_load: float = 0.0  # outstanding tokens, long (stable) window mean
    ready_tes: int = 0
    recently_busy: bool = False  # had load within the scale-to-zero grace


def _rise(c: ModelCandidate) -> float:
    if c.short_load <= c.long_load:
        return 0.0
    return (c.short_load - c.long_load) / max(c.long_load, 1.0)


def choose_preload(candidates: Sequence[ModelCandidate], budget_bytes: int) -> list[str]:
    """The models to keep resident, most wanted first, within `budget_bytes` (a model that does not fit
    is skipped; a smaller one after it may still fit)."""

    def key(c: ModelCandidate) -> tuple[int, float, str]:
        if c.pinned is not None:
            return (0, float(c.pinned), c.model)
        rise = _rise(c)
        if rise > 0:
            return (1, -rise, c.model)
        if c.ready_tes == 0 and c.recently_busy:
            return (2, 0.0, c.model)
        return (3, 0.0, c.model)

    chosen: list[str] = []
    used = 0
    for c in sorted(candidates, key=key):
        if key(c)[0] == 3:
            break  # nothing suggests it will scale
        if used + c.weight_bytes <= budget_bytes:
            chosen.append(c.model)
            used += c.weight_bytes
    return chosen
