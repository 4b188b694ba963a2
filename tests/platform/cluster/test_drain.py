"""The scale-down choice: which TEs drain, pure."""

from __future__ import annotations

from deepflow.platform.cluster.drain import DrainCandidate, choose_drain


def test_a_te_pinning_contexts_is_kept_over_older_and_busier_ones() -> None:
    # te-0 is the oldest and pins a context; te-1 is busier; te-2 is idle: the two without contexts go.
    tes = [
        DrainCandidate("te-0", True, pinned_context_tokens=160, outstanding_tokens=0, started_at=1.0),
        DrainCandidate("te-1", True, pinned_context_tokens=0, outstanding_tokens=500, started_at=2.0),
        DrainCandidate("te-2", True, pinned_context_tokens=0, outstanding_tokens=0, started_at=3.0),
    ]
    assert choose_drain(tes, keep=1) == ["te-2", "te-1"]
    assert choose_drain(tes, keep=2) == ["te-2"]
    assert choose_drain(tes, keep=3) == [] and choose_drain(tes, keep=5) == []


def test_when_every_te_pins_contexts_the_fewest_pinned_tokens_go_first() -> None:
    tes = [
        DrainCandidate("te-0", True, pinned_context_tokens=32, outstanding_tokens=900),
        DrainCandidate("te-1", True, pinned_context_tokens=320, outstanding_tokens=0),
    ]
    assert choose_drain(tes, keep=1) == ["te-0"]


def test_not_serving_first_then_least_loaded_then_youngest() -> None:
    tes = [
        DrainCandidate("te-0", True, outstanding_tokens=10, started_at=1.0),
        DrainCandidate("te-1", False, pinned_context_tokens=0, started_at=0.0),  # starting: nothing lost
        DrainCandidate("te-2", True, outstanding_tokens=10, started_at=5.0),
        DrainCandidate("te-3", True, outstanding_tokens=0, started_at=0.5),
    ]
    assert choose_drain(tes, keep=1) == ["te-1", "te-3", "te-2"]
