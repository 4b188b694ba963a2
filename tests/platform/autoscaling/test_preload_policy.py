"""The DRAM pre-load choice: operator list, rising load, recent scale-to-zero, within the budget."""

from __future__ import annotations

from deepflow.platform.autoscaling.preload_policy import ModelCandidate, choose_preload

GB = 1 << 30


def test_operator_list_first_then_rising_load_then_recent_zero():
    cands = [
        ModelCandidate("flat", GB, short_load=100, long_load=100, ready_tes=1),
        ModelCandidate("rising-fast", GB, short_load=900, long_load=100, ready_tes=1),
        ModelCandidate("rising-slow", GB, short_load=150, long_load=100, ready_tes=1),
        ModelCandidate("pinned-2", GB, pinned=1),
        ModelCandidate("pinned-1", GB, pinned=0),
        ModelCandidate("zeroed", GB, ready_tes=0, recently_busy=True),
        ModelCandidate("cold", GB, ready_tes=0),
    ]
    assert choose_preload(cands, 10 * GB) == ["pinned-1", "pinned-2", "rising-fast", "rising-slow", "zeroed"]


def test_budget_skips_what_does_not_fit_but_keeps_smaller_ones():
    cands = [
        ModelCandidate("big", 8 * GB, pinned=0),
        ModelCandidate("huge", 20 * GB, pinned=1),
        ModelCandidate("small", GB, short_load=10, long_load=1),
    ]
    assert choose_preload(cands, 10 * GB) == ["big", "small"]
    assert choose_preload(cands, 0) == []


def test_a_rise_from_nothing_counts():
    assert choose_preload([ModelCandidate("new", GB, short_load=5, long_load=0)], GB) == ["new"]
