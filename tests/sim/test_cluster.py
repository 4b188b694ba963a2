"""A 64-TE cluster over a few simulated minutes: it finishes, every request completes, the combined policy
spreads the load and keeps conversations where their prefix is cached. Outcomes only, never wall time."""

from __future__ import annotations

from pathlib import Path

from deepflow.sim.simulation import SimConfig, Simulation
from deepflow.sim.workload import WorkloadSpec


def run64(policy: str) -> object:
    spec = WorkloadSpec(
        kind="multi-turn", rate=3.0, duration_s=150, input_len=48, output_len=16, prefix_len=128,
        num_prefixes=8, num_turns=3, seed=5,
    )  # fmt: skip
    return Simulation(SimConfig(num_tes=64, policy=policy), spec).run()


def test_64_tes_for_a_few_simulated_minutes() -> None:
    combined, spread = run64("combined"), run64("round_robin")
    for result in (combined, spread):
        s = result.summary
        assert s.failed == 0 and s.completed == s.num_requests > 1000
        assert result.simulated_s >= 150
        assert s.ttft_ms is not None and s.tpot_ms is not None and s.itl_ms is not None
    # Round robin spreads the conversations over the cluster; the combined policy keeps each one where its
    # prefix is cached (a light load stays balanced by its thresholds), and hits the cache more.
    assert all(te["requests"] for te in spread.per_te)
    assert combined.reasons.get("prefix_match", 0) > combined.summary.completed // 2
    assert combined.summary.cache_hit_fraction > spread.summary.cache_hit_fraction > 0.3


def test_cli_run_writes_json_and_plot(tmp_path: Path, capsys) -> None:
    import json

    from deepflow.cli import main

    out, png = tmp_path / "run.json", tmp_path / "run.png"
    code = main(
        [
            "sim",
            "run",
            "--tes",
            "2",
            "--workload",
            "shared-prefix",
            "--duration",
            "10",
            "--rate",
            "2",
            "--input-len",
            "32",
            "--output-len",
            "8",
            "--prefix-len",
            "64",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "deepflow sim run" in printed and "TTFT" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == data["summary"]["num_requests"] > 0
    assert png.stat().st_size > 1000


def test_cli_default_workload_targets_capacity(capsys) -> None:
    from deepflow.cli import main

    assert (
        main(
            [
                "sim",
                "run",
                "--tes",
                "2",
                "--duration",
                "5",
                "--input-len",
                "32",
                "--output-len",
                "8",
                "--prefix-len",
                "32",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "modelled capacity" in err and "(70%)" in err
