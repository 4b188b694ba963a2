"""Same seed, same run: the report and every request's record are identical; another seed differs."""

from __future__ import annotations

import json
from dataclasses import asdict

from deepflow.sim.simulation import SimConfig, Simulation
from deepflow.sim.workload import WorkloadSpec


def run(seed: int, policy: str = "combined") -> dict:
    spec = WorkloadSpec(
        kind="multi-turn",
        rate=1.5,
        duration_s=20,
        input_len=48,
        output_len=12,
        prefix_len=96,
        num_prefixes=3,
        num_turns=3,
        seed=seed,
    )
    result = Simulation(SimConfig(num_tes=3, policy=policy), spec).run()
    data = result.to_dict()
    data["simulator"].pop("wall_s")
    return data


def test_same_seed_same_report() -> None:
    a, b = run(1), run(1)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["summary"]["completed"] == a["summary"]["num_requests"] > 0


def test_other_seed_other_run() -> None:
    assert run(1)["summary"] != run(2)["summary"]


def test_every_policy_runs_deterministically() -> None:
    for policy in ("round_robin", "least_load", "locality"):
        a, b = run(3, policy), run(3, policy)
        assert a == b
        assert a["summary"]["failed"] == 0


def test_summary_is_the_bench_summary() -> None:
    from deepflow.bench.report import Summary

    spec = WorkloadSpec(kind="random", rate=2, duration_s=5, input_len=32, output_len=4)
    result = Simulation(SimConfig(num_tes=1), spec).run()
    assert isinstance(result.summary, Summary)
    s = asdict(result.summary)
    assert s["ttft_ms"]["count"] == s["completed"] and s["total_output_tokens"] == 4 * s["completed"]
