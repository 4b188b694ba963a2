"""The PD-aware router: the paper's Algorithm 1 over a model's colocated, prefill and decode groups.

`dist_sched(req, tes)` in two steps:

1. **PD_aware** (`select_tes_PD_heatmap`, §5.3.2): predict the request's decode length, look up the
   RPS-summed heatmap's cell for (prompt length, predicted decode length): > 0 → disaggregated, < 0 →
   colocated. Two guards an operator needs and the paper's Figure 6 motivates (at high RPS the 1P1D pair
   overloads first, and PD-aware loses to round robin there):
   - a cell within `margin` of 0 (the uncertain ~20% of cells, §5.3.2) or never measured → the side with
     the lower load (`HEATMAP_UNCERTAIN`, `NO_HEATMAP`);
   - the chosen side's load exceeds the other's by `overload_factor`× and by `overload_min_tokens` → the
     other side (`HEATMAP_LOAD`).
   A side's load is what the request would meet there: the least loaded healthy colocated TE; for the
   disaggregated side the busier of the least loaded prefill and decode TEs (a request needs both).
   With only one mode healthy, that mode (`ONLY_COLOCATED` / `ONLY_DISAGGREGATED`).
2. **Within the chosen group(s)**: locality if the group is balanced, else load — `Combined` (with its
   hot-spot guard) is the default per-group policy; the router is built with the model's policy, which is
   `Combined` unless configured otherwise.
   - Colocated: `policy`.
   - Prefill: `prefill_policy` (default `policy`): the prefill TE computes the prompt's KV, so a cached
     prefix there saves exactly the compute that dominates a prefill — locality pays as in colocated.
   - Decode: `decode_policy` (default `LeastLoad`): a decode TE gets the prompt's KV by transfer whatever it
     caches (a prefix it holds only saves moving those blocks, cheap next to a decode), and every decode
     step runs its whole batch, so the request's TPOT is set by the TE's load; exact load ties go to the
     longer match (less to transfer), then the smaller cache.

Every choice is visible: `Route.mode_reason`, each `Decision.reason`, `Route.predicted_output_tokens`,
`Route.heatmap_value`, and the counters of `report()`. Deterministic and pure: the heatmap file is read
once, at construction; no clock, no I/O afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from deepflow.platform.je.policies.heatmap import Heatmap
from deepflow.platform.je.policies.load import LeastLoad
from deepflow.platform.je.policies.predictors import (
    AccuracyMeter,
    DecodeLengthPredictor,
    MeasuredPredictor,
    make_predictor,
)
from deepflow.platform.je.policies.registry import make_policy
from deepflow.platform.je.policies.router import ModelGroups, ModeReason, Route, ServeMode
from deepflow.platform.je.policies.types import GroupSnapshot, NoHealthyTE, Policy, RoutingRequest

__all__ = ["PDAwareRouter", "load_heatmap"]


def load_heatmap(source: Heatmap | Mapping[str, Any] | str | Path | None) -> Heatmap | None:
    """A heatmap from itself, its JSON dict (`Heatmap.to_dict`), or the path of its JSON file."""
    if source is None or isinstance(source, Heatmap):
        return source
    if isinstance(source, Mapping):
        return Heatmap.from_dict(source)
    try:
        return Heatmap.load(source)
    except OSError as exc:  # a ValueError, as for a malformed one: refused at config time with its reason
        raise ValueError(f"cannot read the PD heatmap {str(source)!r}: {exc.strerror or exc}") from None


def _policy(p: Policy | str | Mapping[str, Any] | None, default: Policy) -> Policy:
    """A per-group policy from itself, a name, or {"name": ..., **params} (cluster.yaml)."""
    if p is None:
        return default
    if isinstance(p, str):
        return make_policy(p)
    if isinstance(p, Mapping):
        params = dict(p)
        return make_policy(params.pop("name"), **params)
    return p


def _min_load(group: GroupSnapshot) -> int:
    return min(te.outstanding_tokens for te in group.healthy())


@dataclass
class PDAwareRouter:
    """Algorithm 1: the mode from the heatmap and a decode-length predictor, then the TE(s) per group.

    heatmap: a `Heatmap`, its JSON dict or the path of its JSON (`deepflow pd-heatmap` writes it); None:
      every request goes to the less loaded side (`NO_HEATMAP`).
    predictor: "learned" (default), "oracle" or "noisy_oracle", with `predictor_params` (e.g.
      {"accuracy": 0.9, "seed": 0}); or a `DecodeLengthPredictor`.
    tolerance: a prediction within a factor 1 + tolerance of the real length counts as accurate.
    margin: cells with |value| <= margin are uncertain (the less loaded side decides).
    overload_factor / overload_min_tokens: the load guard (None: off).
    default_mode: the side taken when the loads tie in an uncertain or unmeasured cell.
    """

    name: ClassVar[str] = "pd_aware"

    policy: Policy
    heatmap: Heatmap | Mapping[str, Any] | str | Path | None = None
    predictor: str | DecodeLengthPredictor = "learned"
    predictor_params: Mapping[str, Any] = field(default_factory=dict)
    tolerance: float = 0.5
    prefill_policy: Policy | str | Mapping[str, Any] | None = None
    decode_policy: Policy | str | Mapping[str, Any] | None = None
    margin: float = 0.0
    overload_factor: float | None = 2.0
    overload_min_tokens: int = 4096
    default_mode: str = "colocated"

    _map: Heatmap | None = field(init=False, repr=False)
    _predictor: MeasuredPredictor = field(init=False, repr=False)
    _prefill: Policy = field(init=False, repr=False)
    _decode: Policy = field(init=False, repr=False)
    _modes: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _mode_reasons: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _te_reasons: dict[str, Counter[str]] = field(default_factory=dict, init=False, repr=False)
    _outside_grid: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.default_mode not in (ServeMode.COLOCATED, ServeMode.DISAGGREGATED):
            raise ValueError(f"default_mode must be colocated or disaggregated, not {self.default_mode!r}")
        if self.margin < 0:
            raise ValueError("margin must be >= 0")
        if self.overload_factor is not None and self.overload_factor <= 1.0:
            raise ValueError("overload_factor must be > 1 (or None: no load guard)")
        if self.overload_min_tokens < 0:
            raise ValueError("overload_min_tokens must be >= 0")
        self._map = load_heatmap(self.heatmap)
        if isinstance(self.predictor, str):
            predictor = make_predictor(self.predictor, **dict(self.predictor_params))
        else:
            if self.predictor_params:
                raise ValueError("predictor_params go with a predictor name, not an instance")
            predictor = self.predictor
        self._predictor = MeasuredPredictor(predictor, AccuracyMeter(tolerance=self.tolerance))
        self._prefill = _policy(self.prefill_policy, self.policy)
        self._decode = _policy(self.decode_policy, LeastLoad())
        self._te_reasons = {role: Counter() for role in ("colocated", "prefill", "decode")}

    # -- Algorithm 1

    def route(self, request: RoutingRequest, groups: ModelGroups) -> Route:
        co, pd = groups.has_colocated(), groups.has_disaggregated()
        if not co and not pd:
            raise NoHealthyTE("any")
        # Predicted for every request, whichever modes are up: the accuracy report then covers them all.
        predicted = self._predictor.predict(request)
        value: float | None = None
        if co and pd:
            mode, reason, value = self.select_tes_pd_heatmap(request, predicted, groups)
        elif co:
            mode, reason = ServeMode.COLOCATED, ModeReason.ONLY_COLOCATED
        else:
            mode, reason = ServeMode.DISAGGREGATED, ModeReason.ONLY_DISAGGREGATED
        if mode is ServeMode.COLOCATED:
            assert groups.colocated is not None
            route = Route(
                mode=mode,
                mode_reason=reason,
                colocated=self.policy.select(request, groups.colocated),
                predicted_output_tokens=predicted,
                heatmap_value=value,
            )
        else:
            assert groups.prefill is not None and groups.decode is not None
            route = Route(
                mode=mode,
                mode_reason=reason,
                prefill=self._prefill.select(request, groups.prefill),
                decode=self._decode.select(request, groups.decode),
                predicted_output_tokens=predicted,
                heatmap_value=value,
            )
        self._count(route)
        return route

    def select_tes_pd_heatmap(
        self, request: RoutingRequest, predicted: int, groups: ModelGroups
    ) -> tuple[ServeMode, ModeReason, float | None]:
        """The mode for a request with both modes healthy: the heatmap's sign, then the load guard."""
        assert groups.colocated is not None and groups.prefill is not None and groups.decode is not None
        loads = {
            ServeMode.COLOCATED: _min_load(groups.colocated),
            ServeMode.DISAGGREGATED: max(_min_load(groups.prefill), _min_load(groups.decode)),
        }
        value: float | None = None
        if self._map is not None:
            cell = self._map.lookup(len(request.prompt_token_ids), predicted)
            value = cell.value
            self._outside_grid += not cell.inside
        if value is None:
            return self._less_loaded(loads), ModeReason.NO_HEATMAP, None
        if abs(value) <= self.margin:
            return self._less_loaded(loads), ModeReason.HEATMAP_UNCERTAIN, value
        mode = ServeMode.DISAGGREGATED if value > 0 else ServeMode.COLOCATED
        other = ServeMode.COLOCATED if mode is ServeMode.DISAGGREGATED else ServeMode.DISAGGREGATED
        if self._overloaded(loads[mode], loads[other]):
            return other, ModeReason.HEATMAP_LOAD, value
        return mode, ModeReason.HEATMAP, value

    def _less_loaded(self, loads: Mapping[ServeMode, int]) -> ServeMode:
        co, pd = loads[ServeMode.COLOCATED], loads[ServeMode.DISAGGREGATED]
        if co == pd:
            return ServeMode(self.default_mode)
        return ServeMode.COLOCATED if co < pd else ServeMode.DISAGGREGATED

    def _overloaded(self, chosen: int, other: int) -> bool:
        if self.overload_factor is None:
            return False
        return chosen > self.overload_factor * other and chosen - other >= self.overload_min_tokens

    # -- feedback and visibility

    def observe(self, request: RoutingRequest, output_tokens: int) -> None:
        self._predictor.observe(request, output_tokens)

    def _count(self, route: Route) -> None:
        self._modes[route.mode] += 1
        self._mode_reasons[route.mode_reason] += 1
        for role, decision in (
            ("colocated", route.colocated),
            ("prefill", route.prefill),
            ("decode", route.decode),
        ):
            if decision is not None:
                self._te_reasons[role][decision.reason] += 1

    def report(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "policies": {
                "colocated": self.policy.name,
                "prefill": self._prefill.name,
                "decode": self._decode.name,
            },
            "margin": self.margin,
            "overload_factor": self.overload_factor,
            "overload_min_tokens": self.overload_min_tokens,
            "default_mode": self.default_mode,
            "heatmap": self._map.describe() if self._map is not None else None,
            "predictor": self._predictor.report(),
            "modes": dict(sorted(self._modes.items())),
            "mode_reasons": dict(sorted(self._mode_reasons.items())),
            "te_reasons": {role: dict(sorted(c.items())) for role, c in self._te_reasons.items()},
            "outside_grid": self._outside_grid,
        }
