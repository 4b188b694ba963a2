"""Locality-aware policy (paper §5.2): the TE holding the longest prefix of the prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deepflow.platform.je.policies.load import load_key
from deepflow.platform.je.policies.types import Decision, GroupSnapshot, Reason, RoutingRequest

__all__ = ["LocalityAware"]


@dataclass(frozen=True)
class LocalityAware:
    """The healthy TE with the longest cached prefix of the prompt, ties broken by load (`load_key`).

    With no match anywhere this is least load. It never looks past the match: a popular prefix stays on
    its holder however loaded it gets; `Combined` adds the guards.
    """

    name: ClassVar[str] = "locality"

    def select(self, request: RoutingRequest, group: GroupSnapshot) -> Decision:
        matched = group.match(request)
        te = min(group.healthy(), key=lambda te: (-matched.get(te.te_id, 0), *load_key(te)))
        best = matched.get(te.te_id, 0)
        return Decision(te.te_id, Reason.PREFIX_MATCH if best else Reason.LOW_MATCH, best)
