"""Load-only policies: round robin and least load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deepflow.platform.je.policies.types import Decision, GroupSnapshot, Reason, RoutingRequest, TELoad

__all__ = ["LeastLoad", "RoundRobin", "load_key"]


def load_key(te: TELoad) -> tuple[int, int, str]:
    """Order TEs by load: fewer outstanding tokens, then fewer running requests, then TE id."""
    return (te.outstanding_tokens, te.num_running, te.te_id)


class RoundRobin:
    """Healthy TEs in turn, in TE-id order: the next id after the last one chosen, wrapping around.

    Keyed by id rather than by position, so TEs joining, leaving or turning unhealthy do not reset the turn.
    """

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def select(self, request: RoutingRequest, group: GroupSnapshot) -> Decision:
        ids = sorted(te.te_id for te in group.healthy())
        te_id = next((i for i in ids if self._last is None or i > self._last), ids[0])
        self._last = te_id
        return Decision(te_id, Reason.ROUND_ROBIN, group.match(request).get(te_id, 0))


@dataclass(frozen=True)
class LeastLoad:
    """The healthy TE with the fewest outstanding tokens, then the fewest running requests.

    Exact ties (idle TEs, most often) go to the TE holding the longer prefix of the prompt, then to the one
    caching the fewest blocks, then by TE id: load decides, but where it cannot, a cache hit is free and the
    smaller cache is the one a new prefix costs least (see `GroupSnapshot.footprint`).
    """

    name: ClassVar[str] = "least_load"

    def select(self, request: RoutingRequest, group: GroupSnapshot) -> Decision:
        matched = group.match(request)
        te = min(
            group.healthy(),
            key=lambda t: (
                t.outstanding_tokens,
                t.num_running,
                -matched.get(t.te_id, 0),
                group.footprint(t.te_id),
                t.te_id,
            ),
        )
        return Decision(te.te_id, Reason.LEAST_LOAD, matched.get(te.te_id, 0))
