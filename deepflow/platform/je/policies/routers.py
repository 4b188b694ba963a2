"""Routers by name (`ModelSpec.router`, the simulator): how a request is split across a model's TE groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deepflow.platform.je.policies.pd import PDAwareRouter
from deepflow.platform.je.policies.router import FixedRouter, Router
from deepflow.platform.je.policies.types import Policy

__all__ = ["ROUTERS", "make_router"]

# name → factory(policy, **params); the policy picks the TE within each group.
ROUTERS: dict[str, Callable[..., Router]] = {
    FixedRouter.name: FixedRouter,
    PDAwareRouter.name: PDAwareRouter,  # Algorithm 1: heatmap + decode-length predictor, then per group
}


def make_router(name: str, policy: Policy, **params: Any) -> Router:
    """A new router `name` ("fixed", "pd_aware") over the per-group `policy`, with its `params`."""
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}") from None
    return factory(policy=policy, **params)
