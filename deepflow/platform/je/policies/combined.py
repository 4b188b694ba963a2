"""The combined policy (paper §5.4, Algorithm 1): locality while the group is balanced, load otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from deepflow.platform.je.policies.load import load_key
from deepflow.platform.je.policies.types import Decision, GroupSnapshot, Reason, RoutingRequest, TELoad

__all__ = ["Combined"]


@dataclass(frozen=True)
class Combined:
    """Algorithm 1 within one TE group (the PD-aware choice of the group, §5.3, happens before).

    Load is a TE's outstanding tokens. In order:

    1. Imbalanced → least load. The group is balanced when max − min ≤ `balance_abs_threshold` or
       max ≤ `balance_rel_threshold` × min (SGLang's cache-aware router's two thresholds).
    2. Low match → the smallest cache, then least load. The longest cached prefix of the prompt on any TE
       covers less than `min_match_ratio` of it: a small hit is not worth concentrating traffic. The group
       is balanced, so the TE caching the fewest blocks (`GroupSnapshot.footprint`, as SGLang's router picks
       its smallest tree) takes the new prefix: caches fill evenly, not the first TE's alone.
    3. Otherwise → the TE with the longest match (ties: least load), unless it is a *hot spot*: its load
       exceeds `hot_spot_factor` × the group's mean and exceeds the least-loaded TE's by at least
       `hot_spot_min_tokens`. Balance in step 1 is judged on max and min only, so one TE can draw a popular
       prefix's whole traffic while staying inside the thresholds — the spiral seen in SGLang's router.
       A hot winner gives way to the least-loaded TE holding at least `replicate_fraction` of the best
       match that is not hot itself; failing that, to the least-loaded TE of the group, which prefills the
       prefix once and from then on is a second holder that takes its share of the prefix's traffic.

    Least-load choices prefer, at equal load, the TE with the longer match, then the smaller cache.
    Stateless and deterministic.
    """

    name: ClassVar[str] = "combined"

    balance_abs_threshold: int = 2048
    balance_rel_threshold: float = 1.5
    min_match_ratio: float = 0.25
    hot_spot_factor: float = 1.25
    hot_spot_min_tokens: int = 1024
    replicate_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.balance_abs_threshold < 0 or self.hot_spot_min_tokens < 0:
            raise ValueError("balance_abs_threshold and hot_spot_min_tokens must be >= 0")
        if self.balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1")
        if self.hot_spot_factor <= 1.0:
            raise ValueError("hot_spot_factor must be > 1")
        if not 0.0 <= self.min_match_ratio <= 1.0 or not 0.0 < self.replicate_fraction <= 1.0:
            raise ValueError("min_match_ratio must be in [0, 1] and replicate_fraction in (0, 1]")

    def is_balanced(self, tes: Sequence[TELoad]) -> bool:
        loads = [te.outstanding_tokens for te in tes]
        lo, hi = min(loads), max(loads)
        return hi - lo <= self.balance_abs_threshold or hi <= self.balance_rel_threshold * lo

    def is_hot(self, te: TELoad, tes: Sequence[TELoad]) -> bool:
        loads = [t.outstanding_tokens for t in tes]
        mean = sum(loads) / len(loads)
        load = te.outstanding_tokens
        return load > self.hot_spot_factor * mean and load - min(loads) >= self.hot_spot_min_tokens

    def select(self, request: RoutingRequest, group: GroupSnapshot) -> Decision:
        tes = group.healthy()
        matched = group.match(request)

        def match_of(te: TELoad) -> int:
            return matched.get(te.te_id, 0)

        def least_load(candidates: Sequence[TELoad]) -> TELoad:  # at equal load, the longer match
            return min(
                candidates,
                key=lambda t: (
                    t.outstanding_tokens,
                    -match_of(t),
                    t.num_running,
                    group.footprint(t.te_id),
                    t.te_id,
                ),
            )

        if not self.is_balanced(tes):
            te = least_load(tes)
            return Decision(te.te_id, Reason.IMBALANCED, match_of(te))

        best = max(map(match_of, tes))
        if best == 0 or best < self.min_match_ratio * len(request.prompt_token_ids):
            te = min(tes, key=lambda t: (group.footprint(t.te_id), *load_key(t)))
            return Decision(te.te_id, Reason.LOW_MATCH, match_of(te))

        winner = min((te for te in tes if match_of(te) == best), key=load_key)
        if not self.is_hot(winner, tes):
            return Decision(winner.te_id, Reason.PREFIX_MATCH, best)

        replicas = [te for te in tes if match_of(te) >= self.replicate_fraction * best]
        te = least_load(replicas)
        if self.is_hot(te, tes):
            te = least_load(tes)  # never hot: its load is at most the mean
        return Decision(te.te_id, Reason.HOT_SPOT, match_of(te))
