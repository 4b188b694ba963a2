"""The cluster manager's autoscaler (paper §6: scale "on load or SLO-violation rates"): pure policy.

No clock, sockets or processes: the CM feeds a `GroupSample` per TE group (a model's colocated, prefill or
decode TEs; each group scales on its own) with its own clock's time, asks for a `ScaleDecision`, and applies
it with the same `ScaleGroup` path an operator uses. The same code runs in the simulator and in unit tests
on a fake clock.

Shaped like Knative's KPA, with the failure modes other autoscalers shipped designed out:

- Load → TEs: `ceil(outstanding tokens / target per TE)` averaged over a *stable* window (60 s), and over a
  short *panic* window (6 s). When the panic window asks for ≥ `panic_threshold` × the ready TEs, the
  group enters panic mode: it scales on the panic window and never scales down until a whole stable window
  has passed without the panic condition.
- SLOs: a TTFT/TPOT violation rate above `max_violation_rate` over the stable window asks for one TE more
  than are ready, whatever the load says (the load target may be wrong for this workload); so does a mean
  KV usage above `max_kv_usage` (preemptions are about to start).
- **No scale-up while TEs are still starting**: a starting TE carries no load yet, so counting only the
  ready ones would ask for the same TEs again on every tick (Knative's and KEDA's classic overshoot). The
  group holds until they are ready and their load shows.
- Scale-down waits `scale_down_cooldown_s` after any change and goes at most to `1/max_scale_down_rate` of
  the current TEs per decision, so a lull between bursts does not tear the group down.
- **Scale to zero** (when `min_tes == 0`) after `scale_to_zero_after_s` with no outstanding work and no
  held request; **from zero** at once when a JE holds requests for the group (no cooldown applies).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from deepflow.platform.autoscaling.windows import WindowedAverage

__all__ = ["Autoscaler", "GroupAutoscaler", "GroupSample", "ScaleDecision", "ScaleReason", "ScalingConfig"]


class ScaleReason(StrEnum):
    """Why a group has the TEs it is asked to have (a bounded set: fit for a metric label)."""

    STEADY = "steady"  # the load fits the TEs it has
    LOAD_UP = "load_up"  # the stable window's load asks for more TEs
    PANIC_UP = "panic_up"  # the panic window's load asks for ≥ panic_threshold × the ready TEs
    SLO_UP = "slo_up"  # SLO violations above the target
    KV_UP = "kv_up"  # KV usage above the target
    LOAD_DOWN = "load_down"  # the stable window's load fits fewer TEs
    TO_ZERO = "to_zero"  # idle for scale_to_zero_after_s
    FROM_ZERO = "from_zero"  # requests are held for a group with no TE
    PENDING_START = "pending_start"  # more TEs wanted, but earlier ones are still starting
    COOLDOWN = "cooldown"  # fewer TEs wanted, but the last change is too recent
    PANIC_HOLD = "panic_hold"  # fewer TEs wanted, but the group is in panic mode
    MIN_TES = "min_tes"  # raised to the group's minimum
    MAX_TES = "max_tes"  # capped at the group's maximum


@dataclass(frozen=True)
class ScalingConfig:
    """One group's scaling bounds and targets (per model in the spec; P and D groups have their own)."""

    min_tes: int = 1
    max_tes: int = 8
    target_outstanding_tokens: int = 8192  # the work one TE should carry (prompt + output tokens owed)
    max_kv_usage: float = 0.9
    max_violation_rate: float = 0.05  # of finished requests over the TTFT or TPOT SLO
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_down_cooldown_s: float = 30.0
    max_scale_up_rate: float = 10.0  # at most this × the ready TEs (at least +1) per decision
    max_scale_down_rate: float = 2.0  # at least 1/this of the current TEs remain per decision
    scale_to_zero_after_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_tes <= self.max_tes or self.max_tes < 1:
            raise ValueError("need 0 <= min_tes <= max_tes and max_tes >= 1")
        if self.target_outstanding_tokens < 1:
            raise ValueError("target_outstanding_tokens must be >= 1")
        if not 0.0 < self.panic_window_s <= self.stable_window_s:
            raise ValueError("need 0 < panic_window_s <= stable_window_s")
        if self.panic_threshold <= 1.0 or self.max_scale_up_rate <= 1.0 or self.max_scale_down_rate <= 1.0:
            raise ValueError("panic_threshold, max_scale_up_rate and max_scale_down_rate must be > 1")
        if not 0.0 < self.max_kv_usage <= 1.0 or not 0.0 <= self.max_violation_rate <= 1.0:
            raise ValueError("max_kv_usage must be in (0, 1] and max_violation_rate in [0, 1]")
        if self.scale_down_cooldown_s < 0 or self.scale_to_zero_after_s < 0:
            raise ValueError("scale_down_cooldown_s and scale_to_zero_after_s must be >= 0")


class GroupSample(msgspec.Struct, frozen=True, kw_only=True):
    """One observation of a group, as the CM sees it (from TE heartbeats and JE reports)."""

    ready: int  # TEs serving
    starting: int = 0  # TEs asked for and not yet ready
    outstanding_tokens: int = 0  # summed over the ready TEs
    kv_usage: float = 0.0  # mean over the ready TEs, 0..1
    held_requests: int = 0  # requests the JEs hold because the group has no TE
    # Of the requests that finished since the last sample, the share over their TTFT or TPOT SLO; None
    # when none finished (no evidence either way).
    slo_violation_rate: float | None = None


class ScaleDecision(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    current: int  # ready + starting
    desired: int
    reason: ScaleReason
    panic: bool = False
    stable_tokens: float = 0.0  # the windowed loads behind the decision, for /v1/cluster
    panic_tokens: float = 0.0

    @property
    def delta(self) -> int:
        return self.desired - self.current


@dataclass
class GroupAutoscaler:
    config: ScalingConfig = field(default_factory=ScalingConfig)
    history: int = 64  # decisions kept for the report (bounded)

    def __post_init__(self) -> None:
        c = self.config
        self._stable = WindowedAverage(c.stable_window_s)
        self._panic = WindowedAverage(c.panic_window_s)
        self._kv = WindowedAverage(c.stable_window_s)
        self._slo = WindowedAverage(c.stable_window_s)
        self._last: GroupSample | None = None
        self._last_change_at: float | None = None
        self._last_busy_at: float | None = None
        self._panic_until: float | None = None  # panic mode lasts until then (extended while it holds)
        self.decisions: deque[ScaleDecision] = deque(maxlen=self.history)

    def observe(self, now: float, sample: GroupSample) -> None:
        self._stable.add(now, sample.outstanding_tokens)
        self._panic.add(now, sample.outstanding_tokens)
        if sample.ready:
            self._kv.add(now, sample.kv_usage)
        if sample.slo_violation_rate is not None:
            self._slo.add(now, sample.slo_violation_rate)
        if sample.outstanding_tokens or sample.held_requests or self._last_busy_at is None:
            self._last_busy_at = now
        self._last = sample

    def decide(self, now: float) -> ScaleDecision:
        """The TEs the group should have now. A decision that changes the count starts the cooldown (the
        CM applies every decision it gets)."""
        c = self.config
        s = self._last if self._last is not None else GroupSample(ready=0)
        current = s.ready + s.starting
        stable = self._stable.mean(now) or 0.0
        panic_load = self._panic.mean(now) or 0.0
        want_stable = math.ceil(stable / c.target_outstanding_tokens)
        want_panic = math.ceil(panic_load / c.target_outstanding_tokens)

        def decision(desired: int, reason: ScaleReason) -> ScaleDecision:
            d = ScaleDecision(
                at=now,
                current=current,
                desired=desired,
                reason=reason,
                panic=self._in_panic(now),
                stable_tokens=stable,
                panic_tokens=panic_load,
            )
            if desired != current:
                self._last_change_at = now
            self.decisions.append(d)
            return d

        if s.ready == 0 and s.starting == 0:
            if s.held_requests:
                return decision(min(c.max_tes, max(c.min_tes, 1)), ScaleReason.FROM_ZERO)
            if c.min_tes == 0:
                return decision(0, ScaleReason.STEADY)

        # Panic mode: entered when the short window asks for panic_threshold × the ready TEs; held for a
        # stable window after the condition last held.
        if s.ready and want_panic >= c.panic_threshold * s.ready:
            self._panic_until = now + c.stable_window_s
        panic = self._in_panic(now)

        desired, reason = want_stable, ScaleReason.LOAD_UP
        if panic and want_panic > desired:
            desired, reason = want_panic, ScaleReason.PANIC_UP
        kv = self._kv.mean(now)
        if kv is not None and kv > c.max_kv_usage and s.ready + 1 > desired:
            desired, reason = s.ready + 1, ScaleReason.KV_UP
        slo = self._slo.mean(now)
        if slo is not None and slo > c.max_violation_rate and s.ready + 1 > desired:
            desired, reason = s.ready + 1, ScaleReason.SLO_UP

        idle_for = now - (self._last_busy_at if self._last_busy_at is not None else now)
        if c.min_tes == 0 and not s.held_requests and idle_for >= c.scale_to_zero_after_s:
            if current == 0:
                return decision(0, ScaleReason.STEADY)
            if self._cooling(now):
                return decision(current, ScaleReason.COOLDOWN)
            return decision(0, ScaleReason.TO_ZERO)
        # Below the idle grace a group keeps at least one TE: the next request must not wait for a start.
        floor = max(c.min_tes, 1 if current else 0)
        if desired < floor:
            desired, reason = floor, ScaleReason.MIN_TES if c.min_tes > 0 else ScaleReason.LOAD_DOWN
        if desired > c.max_tes:
            desired, reason = c.max_tes, ScaleReason.MAX_TES

        if desired > current:
            if s.starting:
                return decision(current, ScaleReason.PENDING_START)
            cap = max(current + 1, math.floor(max(s.ready, 1) * c.max_scale_up_rate))
            return decision(min(desired, cap), reason)
        if desired < current:
            if panic:
                return decision(current, ScaleReason.PANIC_HOLD)
            if s.starting:
                return decision(current, ScaleReason.PENDING_START)
            if self._cooling(now):
                return decision(current, ScaleReason.COOLDOWN)
            floor_rate = math.ceil(current / c.max_scale_down_rate)
            reason = ScaleReason.MIN_TES if desired == c.min_tes and c.min_tes > 0 else ScaleReason.LOAD_DOWN
            return decision(max(desired, floor_rate), reason)
        return decision(current, ScaleReason.STEADY)

    def _in_panic(self, now: float) -> bool:
        return self._panic_until is not None and now < self._panic_until

    def _cooling(self, now: float) -> bool:
        return (
            self._last_change_at is not None
            and now - self._last_change_at < self.config.scale_down_cooldown_s
        )

    def report(self) -> dict[str, Any]:
        last = self.decisions[-1] if self.decisions else None
        return {
            "config": dataclasses.asdict(self.config),
            "last": msgspec.to_builtins(last) if last else None,
            "recent": [msgspec.to_builtins(d) for d in self.decisions if d.desired != d.current][-8:],
        }


@dataclass
class Autoscaler:
    """Every group's autoscaler, keyed by (model, role). Groups without a config are not autoscaled."""

    configs: dict[tuple[str, str], ScalingConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._groups = {key: GroupAutoscaler(cfg) for key, cfg in self.configs.items()}

    def observe(self, now: float, key: tuple[str, str], sample: GroupSample) -> None:
        if (group := self._groups.get(key)) is not None:
            group.observe(now, sample)

    def decide(self, now: float) -> dict[tuple[str, str], ScaleDecision]:
        """A decision per autoscaled group; apply those whose `delta` is not 0."""
        return {key: group.decide(now) for key, group in self._groups.items()}

    def report(self) -> dict[str, Any]:
        return {f"{model}/{role}": group.report() for (model, role), group in self._groups.items()}
