"""The job executor's scheduling policies (paper §5): pure functions of a request and a cluster snapshot.

No torch, sockets, asyncio or clocks: the JE and the simulator run the same code. A policy picks one
healthy TE of a group (`select(request, group) -> Decision`); the group's `GlobalPromptTree` follows its
TEs' caches through their `KVEvent`s.

Across a model's groups (colocated, prefill, decode) a `Router` (`routers.make_router`) chooses the mode
first: `FixedRouter`, or `PDAwareRouter` (Algorithm 1: the PD heatmap of `heatmap.Heatmap` and a
decode-length predictor of `predictors`), then the TE(s) with the per-group policies.
"""

from __future__ import annotations

from deepflow.platform.je.policies.combined import Combined
from deepflow.platform.je.policies.estimate import estimated_load, routed_tokens
from deepflow.platform.je.policies.heatmap import Heatmap
from deepflow.platform.je.policies.load import LeastLoad, RoundRobin, load_key
from deepflow.platform.je.policies.locality import LocalityAware
from deepflow.platform.je.policies.pd import PDAwareRouter
from deepflow.platform.je.policies.predictors import PREDICTORS, make_predictor
from deepflow.platform.je.policies.prompt_tree import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    GlobalPromptTree,
    KVEvent,
    hash_blocks,
    iter_block_hashes,
    root_hash,
)
from deepflow.platform.je.policies.registry import POLICIES, make_policy
from deepflow.platform.je.policies.routers import ROUTERS, make_router
from deepflow.platform.je.policies.types import (
    ClusterSnapshot,
    Decision,
    GroupSnapshot,
    NoHealthyTE,
    Policy,
    PrefixIndex,
    Reason,
    RoutingRequest,
    TELoad,
)

__all__ = [
    "POLICIES",
    "PREDICTORS",
    "ROUTERS",
    "AllCleared",
    "BlockRemoved",
    "BlockStored",
    "ClusterSnapshot",
    "Combined",
    "Decision",
    "GlobalPromptTree",
    "GroupSnapshot",
    "Heatmap",
    "KVEvent",
    "LeastLoad",
    "LocalityAware",
    "NoHealthyTE",
    "PDAwareRouter",
    "Policy",
    "PrefixIndex",
    "Reason",
    "RoundRobin",
    "RoutingRequest",
    "TELoad",
    "estimated_load",
    "hash_blocks",
    "iter_block_hashes",
    "load_key",
    "make_policy",
    "make_predictor",
    "make_router",
    "root_hash",
    "routed_tokens",
]
