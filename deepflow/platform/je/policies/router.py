"""Routing a request across a model's TE groups: colocated, or disaggregated over a prefill and a decode TE.

A model is served by up to three TE groups, one per role (`TERole`). A `Router` first chooses how to serve
the request (`ServeMode`, paper §5.3: PD-aware), then which TE(s) within the chosen group(s) with a
per-group `Policy` (§5.4, Algorithm 1). Pure: the JE and the simulator run the same routers.

`FixedRouter` is the default: a deployment with only one kind of group serves every request that way; with
both it follows `prefer` (always colocated, always disaggregated, or alternating). The PD-aware router
(heatmap + decode-length predictor) implements the same `Router` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import msgspec

from deepflow.platform.je.policies.types import Decision, GroupSnapshot, NoHealthyTE, Policy, RoutingRequest

__all__ = ["FixedRouter", "ModeReason", "ModelGroups", "Route", "Router", "ServeMode", "TERole"]


class TERole(StrEnum):
    COLOCATED = "colocated"  # prefill and decode on one TE
    PREFILL = "prefill"  # prefills, sends the KV to a decode TE, samples the first token
    DECODE = "decode"  # receives the prompt's KV and decodes


class ServeMode(StrEnum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


class ModeReason(StrEnum):
    """Why a request was served colocated or disaggregated (a bounded set: fit for a metric label)."""

    ONLY_COLOCATED = "only_colocated"  # no healthy prefill + decode pair
    ONLY_DISAGGREGATED = "only_disaggregated"  # no healthy colocated TE
    FIXED = "fixed"  # the router's configured preference
    ALTERNATE = "alternate"  # alternating between the two
    HEATMAP = "heatmap"  # the PD-aware choice: the measured heatmap's cell for the request
    HEATMAP_LOAD = "heatmap_load"  # the heatmap's choice was overruled by the chosen side's load
    HEATMAP_UNCERTAIN = (
        "heatmap_uncertain"  # the cell is within the router's margin of 0: the less loaded side
    )
    NO_HEATMAP = "no_heatmap"  # no heatmap, or its cell was never measured: the less loaded side
    CONTEXT = "context"  # a pinned context lives on a colocated TE


@dataclass(frozen=True)
class ModelGroups:
    """A model's TE groups as the JE sees them at one instant; a role without TEs is None."""

    colocated: GroupSnapshot | None = None
    prefill: GroupSnapshot | None = None
    decode: GroupSnapshot | None = None

    def has_colocated(self) -> bool:
        return self.colocated is not None and any(te.healthy for te in self.colocated.tes)

    def has_disaggregated(self) -> bool:
        return all(g is not None and any(te.healthy for te in g.tes) for g in (self.prefill, self.decode))

    def group(self, role: TERole) -> GroupSnapshot | None:
        return {TERole.COLOCATED: self.colocated, TERole.PREFILL: self.prefill, TERole.DECODE: self.decode}[
            role
        ]


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """Where one request goes: one colocated TE, or a prefill TE and a decode TE."""

    mode: ServeMode
    mode_reason: ModeReason
    colocated: Decision | None = None  # mode == COLOCATED
    prefill: Decision | None = None  # mode == DISAGGREGATED
    decode: Decision | None = None  # mode == DISAGGREGATED
    predicted_output_tokens: int | None = None  # what a PD-aware router's predictor said
    heatmap_value: float | None = None  # the heatmap cell a PD-aware router read (JCT_coloc/JCT_disagg - 1)

    @property
    def te_ids(self) -> list[str]:
        return [d.te_id for d in (self.colocated, self.prefill, self.decode) if d is not None]


class Router(Protocol):
    name: str

    def route(self, request: RoutingRequest, groups: ModelGroups) -> Route:
        """Choose the mode and the TE(s); raise `NoHealthyTE` when neither mode has healthy TEs."""
        ...

    def observe(self, request: RoutingRequest, output_tokens: int) -> None:
        """A routed request finished with `output_tokens` tokens (online predictors learn from it)."""
        ...

    def report(self) -> dict[str, Any]:
        """JSON-able state for `/v1/cluster` (e.g. a predictor's accuracy)."""
        ...


def route_colocated(
    policy: Policy, request: RoutingRequest, group: GroupSnapshot, reason: ModeReason
) -> Route:
    return Route(mode=ServeMode.COLOCATED, mode_reason=reason, colocated=policy.select(request, group))


def route_disaggregated(
    prefill_policy: Policy,
    decode_policy: Policy,
    request: RoutingRequest,
    prefill: GroupSnapshot,
    decode: GroupSnapshot,
    reason: ModeReason,
) -> Route:
    return Route(
        mode=ServeMode.DISAGGREGATED,
        mode_reason=reason,
        prefill=prefill_policy.select(request, prefill),
        decode=decode_policy.select(request, decode),
    )


@dataclass
class FixedRouter:
    """Colocated or disaggregated by configuration; `policy` picks the TE within each group.

    prefer: "colocated", "disaggregated" or "alternate" — used only when both kinds are available.
    """

    name: ClassVar[str] = "fixed"

    policy: Policy
    prefer: str = "colocated"
    decode_policy: Policy | None = None  # defaults to `policy`
    _turn: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.prefer not in ("colocated", "disaggregated", "alternate"):
            raise ValueError(f"prefer must be colocated, disaggregated or alternate, not {self.prefer!r}")

    def route(self, request: RoutingRequest, groups: ModelGroups) -> Route:
        co, pd = groups.has_colocated(), groups.has_disaggregated()
        if not co and not pd:
            raise NoHealthyTE("any")
        if co and not pd:
            return route_colocated(self.policy, request, groups.colocated, ModeReason.ONLY_COLOCATED)  # type: ignore[arg-type]
        if pd and not co:
            return self._disagg(request, groups, ModeReason.ONLY_DISAGGREGATED)
        if self.prefer == "alternate":
            self._turn += 1
            if self._turn % 2:
                return self._disagg(request, groups, ModeReason.ALTERNATE)
            return route_colocated(self.policy, request, groups.colocated, ModeReason.ALTERNATE)  # type: ignore[arg-type]
        if self.prefer == "disaggregated":
            return self._disagg(request, groups, ModeReason.FIXED)
        return route_colocated(self.policy, request, groups.colocated, ModeReason.FIXED)  # type: ignore[arg-type]

    def _disagg(self, request: RoutingRequest, groups: ModelGroups, reason: ModeReason) -> Route:
        return route_disaggregated(
            self.policy,
            self.decode_policy or self.policy,
            request,
            groups.prefill,
            groups.decode,
            reason,  # type: ignore[arg-type]
        )

    def observe(self, request: RoutingRequest, output_tokens: int) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {"router": self.name, "prefer": self.prefer}
