"""Workloads: Poisson arrivals over the duration, the bench generators' prompts, chat histories carrying
the real answers (so later turns hit the cache), and trace replay (including a bench --json file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepflow.sim.simulation import SimConfig, Simulation
from deepflow.sim.workload import IM_START, TraceWorkload, Workload, WorkloadSpec, chat_prompt


def test_poisson_sessions_cover_the_duration_at_the_rate() -> None:
    spec = WorkloadSpec(kind="random", rate=20.0, duration_s=50.0, input_len=8, output_len=2)
    sessions = list(Workload(spec))
    assert 850 < len(sessions) < 1150
    starts = [s.start_s for s in sessions]
    assert starts == sorted(starts) and starts[0] == 0.0 and starts[-1] < 50.0
    assert all(len(s.turns) == 1 and len(s.turns[0].prompt) == 8 for s in sessions)
    assert [s.turns[0].prompt for s in Workload(spec)][:5] == [s.turns[0].prompt for s in sessions[:5]]


def test_shared_prefix_sessions_share_their_prefix() -> None:
    spec = WorkloadSpec(
        kind="shared-prefix", rate=5, duration_s=4, input_len=16, prefix_len=64, num_prefixes=2
    )
    sessions = list(Workload(spec))
    prefixes = {tuple(s.turns[0].prompt[:64]) for s in sessions}
    assert len(prefixes) == 2 and all(len(s.turns[0].prompt) == 80 for s in sessions)


def test_zipf_prefix_popularity_is_skewed_and_uniform_draws_are_unchanged() -> None:
    base = dict(kind="shared-prefix", rate=50, duration_s=40, input_len=4, prefix_len=16, num_prefixes=8)
    zipf = list(Workload(WorkloadSpec(**base, prefix_zipf=1.2)))
    w = Workload(WorkloadSpec(**base, prefix_zipf=1.2))
    counts = [0] * 8
    for s in zipf:
        counts[w.prefixes.index(s.turns[0].prompt[:16])] += 1
    # p(k) ~ 1/(k+1)^1.2: the first prefix draws ~38%, the last ~3%.
    assert counts[0] > 0.3 * len(zipf) and counts[0] > 4 * counts[7] and counts[0] > counts[1] > counts[3]
    assert "Zipf s=1.2" in w.describe()
    uniform = [s.turns[0].prompt for s in Workload(WorkloadSpec(**base))]
    assert uniform == [s.turns[0].prompt for s in Workload(WorkloadSpec(**base, prefix_zipf=0.0))]
    with pytest.raises(ValueError, match="prefix_zipf"):
        WorkloadSpec(**base, prefix_zipf=-1.0).validate()


def test_chat_prompt_holds_the_history() -> None:
    prompt = chat_prompt([5, 6], [([7], [8, 9])], [10])
    assert prompt[:3] == [IM_START, 9690, 198] and prompt.count(IM_START) == 5
    first = chat_prompt([5, 6], [], [7])
    assert prompt[: len(first) - 3] == first[:-3]  # a turn's prompt extends the previous turn's


def test_multi_turn_later_turns_hit_the_cache() -> None:
    spec = WorkloadSpec(
        kind="multi-turn", rate=0.5, duration_s=10, input_len=40, output_len=10, prefix_len=64, num_turns=3
    )
    result = Simulation(SimConfig(num_tes=2), spec).run()
    by_turn: dict[int, list[float]] = {}
    for r in result.records:
        assert r.success
        by_turn.setdefault(r.turn, []).append((r.cached_tokens or 0) / r.prompt_len)
    assert max(by_turn[0]) < 0.9  # first turns: at most the system prompt
    assert min(by_turn[2]) > 0.6  # third turns: system prompt + both earlier turns with their answers
    assert all(r.prompt_len > 64 + 3 * 40 for r in result.records if r.turn == 2)


def test_trace_replay(tmp_path: Path) -> None:
    trace = {
        "requests": [
            {"arrival_s": 0.0, "prompt_len": 50, "output_len": 5, "prefix_group": "sys", "prefix_len": 32},
            {
                "arrival_s": 0.2,
                "prompt_len": 60,
                "output_len": 3,
                "max_tokens": 10,
                "prefix_group": "sys",
                "prefix_len": 32,
            },
            {
                "arrival_s": 0.1,
                "prompt_token_ids": [11, 12, 13, 14],
                "output_len": 2,
                "session": "c",
                "turn": 0,
            },
            {
                "arrival_s": 0.1,
                "prompt_token_ids": [11, 12, 13, 14, 15],
                "output_len": 2,
                "session": "c",
                "turn": 1,
            },
        ]
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    sessions = list(TraceWorkload(path))
    assert [s.start_s for s in sessions] == [0.0, 0.1, 0.2]
    assert sessions[0].turns[0].prompt[:32] == sessions[2].turns[0].prompt[:32]
    assert len(sessions[1].turns) == 2
    result = Simulation(SimConfig(num_tes=1), TraceWorkload(path)).run()
    outputs = sorted((r.session, r.turn, r.output_tokens) for r in result.records)
    assert outputs == [
        (0, 0, 5),
        (1, 0, 3),
        (2, 0, 2),
        (2, 1, 2),
    ]  # the second ends by EOS at 3 < max_tokens 10


def test_bench_json_replays(tmp_path: Path) -> None:
    bench = {
        "requests": [
            {"index": 0, "session": 0, "turn": 0, "prompt_len": 20, "start_ms": 0.0, "output_tokens": 4},
            {"index": 1, "session": 1, "turn": 0, "prompt_len": 30, "start_ms": 500.0, "output_tokens": 6},
            {"index": 2, "session": 2, "turn": 0, "prompt_len": 30, "start_ms": None, "output_tokens": 0},
        ]
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    result = Simulation(SimConfig(num_tes=1), TraceWorkload(path)).run()
    assert sorted(r.output_tokens for r in result.records) == [4, 6]


def test_bad_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="workload"):
        WorkloadSpec(kind="chat").validate()
    with pytest.raises(ValueError):
        WorkloadSpec(rate=0).validate()
