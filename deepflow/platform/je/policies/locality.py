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

    With no match anywhere the TE caching the fewest blocks takes it (then the least loaded): misses
    spread over the group's caches instead of all filling the first TE's (`GroupSnapshot.footprint`). It
    never looks past the match: a popular prefix stays on its holder however loaded it gets; `Combined`
    adds the guards.
    """

    name: ClassVar[str] = "locality"

    def select(self, request: RoutingRequest, group: GroupSnapshot) -> Decision:
        matched = group.match(request)
        tes = group.healthy()
        best = max((matched.get(te.te_id, 0) for te in tes), default=0)
        if best == 0:
            te = min(tes, key=lambda t: (group.footprint(t.te_id), *load_key(t)))
            return Decision(te.te_id, Reason.LOW_MATCH, 0)
        te = min((t for t in tes if matched.get(t.te_id, 0) == best), key=load_key)
        return Decision(te.te_id, Reason.PREFIX_MATCH, best)
