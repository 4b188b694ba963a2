"""What a policy sees and says: a request, a read-only snapshot of a TE group, and a decision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import msgspec

__all__ = [
    "ClusterSnapshot",
    "Decision",
    "GroupSnapshot",
    "NoHealthyTE",
    "Policy",
    "PrefixIndex",
    "Reason",
    "RoutingRequest",
    "TELoad",
]


class TELoad(msgspec.Struct, frozen=True):
    """One TE's load as it last reported it."""

    te_id: str
    num_running: int = 0
    num_waiting: int = 0
    # Prompt tokens not yet prefilled + decode tokens still to generate (estimated by the TE).
    outstanding_tokens: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    healthy: bool = True


class RoutingRequest(msgspec.Struct, frozen=True):
    """The part of a request a policy looks at."""

    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str = ""  # namespace of the prefix cache: prompts with different salts never share KV
    # The client's output budget (the JE and the simulator pass `max_tokens`): the most a request can
    # generate. PD-aware routing (§5.3) caps its decode-length predictions by it; the per-group policies
    # do not use it.
    expected_output_tokens: int | None = None
    # `ignore_eos`: the request generates exactly `expected_output_tokens` tokens, so its decode length is
    # known (benchmarks, `deepflow pd-heatmap`).
    ignore_eos: bool = False
    # The real output length, known only where the future is (a simulation replaying a trace, a study):
    # what the oracle predictor answers. None in production.
    true_output_tokens: int | None = None


class PrefixIndex(Protocol):
    """Read-only view of a group's global prompt tree (`GlobalPromptTree` implements it)."""

    def match(self, namespace: str, token_ids: Sequence[int]) -> dict[str, int]: ...

    def num_blocks(self, te_id: str) -> int:
        """How many blocks `te_id` caches (its cache footprint: misses go to the smallest)."""
        ...


class NoHealthyTE(RuntimeError):
    """The group has no healthy TE to send the request to."""

    def __init__(self, group: str) -> None:
        super().__init__(f"no healthy TE in group {group!r}")
        self.group = group


@dataclass(frozen=True)
class GroupSnapshot:
    """A TE group (one type of TE, §5.2) as the JE sees it at one instant. Policies only read it."""

    tes: Sequence[TELoad]
    tree: PrefixIndex | None = None
    name: str = "default"

    def healthy(self) -> list[TELoad]:
        """The healthy TEs; raises `NoHealthyTE` when there is none."""
        tes = [te for te in self.tes if te.healthy]
        if not tes:
            raise NoHealthyTE(self.name)
        return tes

    def match(self, request: RoutingRequest) -> dict[str, int]:
        """Longest cached prefix (tokens) of the request's prompt per TE; {} without a tree."""
        if self.tree is None:
            return {}
        return self.tree.match(request.cache_salt, request.prompt_token_ids)

    def footprint(self, te_id: str) -> int:
        """Blocks `te_id` caches per the prompt tree; 0 without a tree (or one that does not count them).

        A miss goes to the smallest footprint (SGLang's router does the same with its trees' sizes): sent to
        the TE with the least cached, the new prefix evicts the least and the group's caches fill evenly,
        where a tie broken by TE id would fill the first TE's cache while the others' stay empty.
        """
        count = getattr(self.tree, "num_blocks", None)
        return count(te_id) if count is not None else 0


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every TE group of a model (e.g. PD-colocated, PD-disaggregated), keyed by group name."""

    groups: Mapping[str, GroupSnapshot] = field(default_factory=dict)

    def group(self, name: str) -> GroupSnapshot:
        return self.groups[name]


class Reason(StrEnum):
    """Why a TE was chosen (a bounded set: fit for a metric label)."""

    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    PREFIX_MATCH = "prefix_match"  # the TE with the longest cached prefix
    LOW_MATCH = "low_match"  # no TE caches enough of the prompt: least load
    IMBALANCED = "imbalanced"  # the group's load is skewed: least load
    HOT_SPOT = "hot_spot"  # the prefix's holder is overloaded: a less loaded (future) holder
    CONTEXT = "context"  # the request names a pinned context: the TE holding it


class Decision(msgspec.Struct, frozen=True):
    te_id: str
    reason: Reason
    matched_tokens: int = 0  # cached prefix the chosen TE holds, per the prompt tree


class Policy(Protocol):
    name: str

    def select(self, request: RoutingRequest, group: GroupSnapshot) -> Decision:
        """Pick a healthy TE of `group` for `request`; raise `NoHealthyTE` when there is none."""
        ...
