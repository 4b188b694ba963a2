"""Which TEs a scale-down drains: pure (no sockets, processes or clock), so it is unit-tested on its own.

A TE that holds pinned contexts is the most expensive to lose: their KV (prompts a client asked us to keep)
would have to be computed again on a survivor. So the order is: TEs that are not serving yet (nothing is
lost: they are stopped at once), then TEs pinning no context tokens, then the fewest pinned tokens, then the
least outstanding work (the drain ends sooner), then the youngest (the least warm prefix cache). A TE whose
stats are unknown yet counts as pinning nothing and as idle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DrainCandidate:
    te_id: str
    serving: bool  # ready: it may hold requests and contexts (else starting or dead: stopped at once)
    pinned_context_tokens: int = 0
    outstanding_tokens: int = 0
    started_at: float = 0.0  # unix seconds: breaks ties towards the youngest


def choose_drain(candidates: Sequence[DrainCandidate], keep: int) -> list[str]:
    """The ids of the TEs to drain so that `keep` of `candidates` remain, in drain order."""
    surplus = max(0, len(candidates) - keep)
    order = sorted(
        candidates,
        key=lambda c: (
            c.serving,
            c.pinned_context_tokens > 0,
            c.pinned_context_tokens,
            c.outstanding_tokens,
            -c.started_at,
            c.te_id,
        ),
    )
    return [c.te_id for c in order[:surplus]]
