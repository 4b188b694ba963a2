"""`deepflow pd-heatmap` against two fake OpenAI servers: exact JCTs on virtual time, then JSON, PNG, CLI.

The fakes stand for the two deployments: the "colocated" one answers sooner (TTFT 50 ms) but decodes slower
(10 ms per token) than the "disaggregated" one (80 ms, 5 ms). On virtual time the benchmark measures those
delays exactly, so every cell's value is known in closed form: JCT(d) = TTFT + (d - 1) × ITL.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from deepflow.bench.clock import LoopClock
from deepflow.bench.pd_heatmap import (
    _STREAM_BASE,
    PDHeatmapConfig,
    PDHeatmapResult,
    _arrivals,
    plot_heatmap,
    run_pd_heatmap,
)
from deepflow.cli import main
from deepflow.platform.je.policies import Combined, RoutingRequest
from deepflow.platform.je.policies.heatmap import Heatmap
from deepflow.platform.je.policies.pd import PDAwareRouter
from deepflow.platform.je.policies.router import ModelGroups, ServeMode
from deepflow.platform.je.policies.types import GroupSnapshot, TELoad
from tests.bench.fake_server import Behavior, FakeOpenAIServer
from tests.bench.virtual_time import run_virtual

CO = Behavior(ttft_s=0.05, itl_s=0.01)
PD = Behavior(ttft_s=0.08, itl_s=0.005)


def jct(b: Behavior, decode: int) -> float:
    return b.ttft_s + (decode - 1) * b.itl_s


def measure(**overrides: object) -> tuple[PDHeatmapResult, FakeOpenAIServer, FakeOpenAIServer]:
    async def go() -> tuple[PDHeatmapResult, FakeOpenAIServer, FakeOpenAIServer]:
        clock = LoopClock()
        async with FakeOpenAIServer(CO, clock=clock) as co, FakeOpenAIServer(PD, clock=clock) as pd:
            settings: dict[str, object] = dict(
                colocated_url=co.url,
                disaggregated_url=pd.url,
                model="fake",
                prefill_lengths=(16, 64),
                ratios=(0.125, 1.0),
                rps=(2.0, 8.0),
                num_prompts=5,
                warmup=1,
            )
            settings.update(overrides)
            config = PDHeatmapConfig(**settings)  # type: ignore[arg-type]
            transports = {"colocated": co.transport(), "disaggregated": pd.transport()}
            result = await run_pd_heatmap(config, clock=clock, transports=transports)
            return result, co, pd

    return run_virtual(go())


def test_cells_hold_the_jct_ratio_minus_one_at_every_rps() -> None:
    result, co, pd = measure()
    h = result.heatmap
    assert h.prefill_lengths == (16, 64) and h.ratios == (0.125, 1.0) and h.rps == (2.0, 8.0)
    for grid in h.by_rps.values():
        for i, prefill in enumerate(h.prefill_lengths):
            for j, ratio in enumerate(h.ratios):
                d = PDHeatmapConfig.decode_len(prefill, ratio)
                assert grid[i][j] == pytest.approx(jct(CO, d) / jct(PD, d) - 1, abs=1e-9)
    # Short answers favour the quick first token (colocated here), long ones the fast decode.
    assert h.summed[0][0] < 0 < h.summed[1][1]
    assert h.stability() == 1.0
    # 2 RPS x 4 cells x 5 requests, plus the warm-up, on each; the decode length is max_tokens, ignore_eos.
    assert len(co.requests) == len(pd.requests) == 41
    measured = co.requests[1:]
    assert all(body["ignore_eos"] is True and body["temperature"] == 0.0 for body in measured)
    assert {(len(b["prompt"]), b["max_tokens"]) for b in measured} == {(16, 2), (16, 16), (64, 8), (64, 64)}
    # Both deployments got the same prompts; no two runs share one (no cross-run prefix-cache hits).
    assert [b["prompt"] for b in co.requests] == [b["prompt"] for b in pd.requests]
    assert len({tuple(b["prompt"]) for b in measured}) == 40
    runs = result.runs
    assert len(runs) == 16 and all(r.completed == 5 and r.failed == 0 for r in runs)
    assert h.meta["measurements"][0]["deployment"] == "colocated" and h.meta["model"] == "fake"


def test_arrivals_are_open_loop_poisson_at_each_rps() -> None:
    _, co, pd = measure(prefill_lengths=(16,), ratios=(4.0,), rps=(20.0,), num_prompts=6, warmup=0)
    # Arrivals at the Poisson offsets of the run's own random stream, exactly (virtual time), the same on
    # both deployments; a 64-token answer takes 0.68 s, so at 20 RPS requests overlap (open loop).
    expected = _arrivals(6, 20.0, 0, _STREAM_BASE + 3)
    assert [t - co.arrivals[0] for t in co.arrivals] == pytest.approx(expected, abs=1e-9)
    assert [t - pd.arrivals[0] for t in pd.arrivals] == pytest.approx(expected, abs=1e-9)
    assert len(set(round(b - a, 9) for a, b in itertools.pairwise(expected))) == 5
    assert co.max_in_flight >= 2


def test_a_failing_deployment_leaves_its_cells_unmeasured() -> None:
    async def go() -> PDHeatmapResult:
        clock = LoopClock()
        async with (
            FakeOpenAIServer(CO, clock=clock) as co,
            FakeOpenAIServer(Behavior(fail_every=1), clock=clock) as pd,
        ):
            config = PDHeatmapConfig(
                co.url,
                pd.url,
                "fake",
                prefill_lengths=(16,),
                ratios=(1.0,),
                rps=(1.0,),
                num_prompts=2,
                warmup=0,
            )
            transports = {"colocated": co.transport(), "disaggregated": pd.transport()}
            return await run_pd_heatmap(config, clock=clock, transports=transports)

    result = run_virtual(go())
    assert result.heatmap.summed == ((None,),)
    bad = next(r for r in result.runs if r.deployment == "disaggregated")
    assert bad.completed == 0 and bad.errors == {"HTTP 500": 2}


def test_the_measured_heatmap_drives_the_router(tmp_path: Path) -> None:
    result, _, _ = measure()
    path = tmp_path / "h.json"
    result.heatmap.save(path)
    router = PDAwareRouter(policy=Combined(), heatmap=str(path), predictor="oracle")
    groups = ModelGroups(
        colocated=GroupSnapshot([TELoad("c0")]),
        prefill=GroupSnapshot([TELoad("p0")]),
        decode=GroupSnapshot([TELoad("d0")]),
    )

    def mode(prompt: int, output: int) -> ServeMode:
        return router.route(RoutingRequest("r", list(range(prompt)), true_output_tokens=output), groups).mode

    assert mode(16, 2) is ServeMode.COLOCATED and mode(64, 64) is ServeMode.DISAGGREGATED


def test_png_is_written(tmp_path: Path) -> None:
    h = Heatmap((128, 512), (0.25, 1.0), {1.0: [[-0.2, 0.1], [0.8, None]], 4.0: [[-0.3, -0.1], [1.2, 0.4]]})
    out = tmp_path / "fig" / "h.png"
    plot_heatmap(h, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_validation() -> None:
    ok = dict(colocated_url="http://a", disaggregated_url="http://b", model="m")
    PDHeatmapConfig(**ok).validate()  # type: ignore[arg-type]
    for bad in (
        {"colocated_url": "a"},
        {"ratios": (1.0, 0.5)},
        {"rps": (0.0,)},
        {"prefill_lengths": ()},
        {"num_prompts": 0},
    ):
        with pytest.raises(ValueError):
            PDHeatmapConfig(**{**ok, **bad}).validate()  # type: ignore[arg-type]
    assert PDHeatmapConfig.decode_len(128, 0.001) == 1 and PDHeatmapConfig.decode_len(100, 0.25) == 25


def test_cli_writes_json_and_png_over_real_sockets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Real time and sockets: counts and structure only (no latency is asserted).
    fast = Behavior(ttft_s=0.001, itl_s=0.001)
    with FakeOpenAIServer(fast) as co, FakeOpenAIServer(fast) as pd:
        out = tmp_path / "pd"
        rc = main(
            [
                "pd-heatmap",
                "--colocated-url", co.url,
                "--disaggregated-url", f"{pd.url}/v1",
                "--model", "fake",
                "--prefill-lengths", "8,32",
                "--ratios", "0.5",
                "--rps", "50",
                "--num-prompts", "2",
                "--warmup", "0",
                "--no-progress",
                "--out", str(out),
            ]
        )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "pd.json").read_text())
    assert data["schema_version"] == 1 and data["prefill_lengths"] == [8, 32] and data["ratios"] == [0.5]
    assert all(v is not None for row in data["summed"] for v in row)
    assert (tmp_path / "pd.png").read_bytes()[:4] == b"\x89PNG"
    assert "stability across RPS" in capsys.readouterr().out
    assert len(co.requests) == len(pd.requests) == 4
    assert (
        main(["pd-heatmap", "--colocated-url", "x", "--disaggregated-url", "http://b", "--model", "m"]) == 2
    )


def test_cli_defaults_are_the_configs() -> None:
    from deepflow.cli import build_parser

    args = build_parser().parse_args(
        ["pd-heatmap", "--colocated-url", "http://a", "--disaggregated-url", "http://b", "--model", "m"]
    )
    default = PDHeatmapConfig("http://a", "http://b", "m")
    assert tuple(args.prefill_lengths) == default.prefill_lengths and tuple(args.ratios) == default.ratios
    assert tuple(args.rps) == default.rps and args.num_prompts == default.num_prompts
    assert args.warmup == default.warmup and args.timeout == default.timeout
