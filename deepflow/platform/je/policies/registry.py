"""Policies by name, for configuration files and the simulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deepflow.platform.je.policies.combined import Combined
from deepflow.platform.je.policies.load import LeastLoad, RoundRobin
from deepflow.platform.je.policies.locality import LocalityAware
from deepflow.platform.je.policies.types import Policy

__all__ = ["POLICIES", "make_policy"]

POLICIES: dict[str, Callable[..., Policy]] = {
    RoundRobin.name: RoundRobin,
    LeastLoad.name: LeastLoad,
    LocalityAware.name: LocalityAware,
    Combined.name: Combined,
}


def make_policy(name: str, **params: Any) -> Policy:
    """A new policy `name` ("round_robin", "least_load", "locality", "combined") with its `params`."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return factory(**params)
