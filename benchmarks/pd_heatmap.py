"""The paper's Figure 5 on this machine: colocated vs disaggregated JCT heatmap, from real servers.

Reproduce (writes benchmarks/results/pd_heatmap.json and .png, the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/pd_heatmap.py

Full form:

    python benchmarks/pd_heatmap.py [--tes 2] [--pd 1:1] [--prefill-lengths 128,512]
        [--ratios 0.03125,0.125,0.5] [--rps 1,4] [--num-prompts 6] [--seed 0] [--model PATH] [--port 8320]
        [--kv-cache-memory 256MiB] [--startup-timeout 300] [--out benchmarks/results/pd_heatmap]
        [--sequential]

Starts two servers on 127.0.0.1 — `deepflow serve --tes N` (colocated, port P) and `deepflow serve --pd
P:D` (disaggregated, port P+1), the same model and the same total number of TEs by default (2 vs 1P+1D, as
the paper's Figure 6 compares) — waits for /health, and runs `deepflow pd-heatmap` against them
(`deepflow.bench.pd_heatmap.run_pd_heatmap`; see its docstring for the method). With --sequential, one
server at a time (the colocated grid first, then the disaggregated one: on a small machine the two
deployments then do not compete for the cores, at the price of comparing runs made at different times).
Server logs go next to the output.

Then serve with the PD-aware router: `router: pd_aware` and `router_params: {heatmap: OUT.json, predictor:
learned}` in cluster.yaml.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server, log  # same server handling

from deepflow.bench.pd_heatmap import (
    DEFAULT_PREFILL_LENGTHS,
    DEFAULT_RATIOS,
    DEFAULT_RPS,
    PDHeatmapConfig,
    PDHeatmapResult,
    _progress,
    run_pd_heatmap,
    write_outputs,
)
from deepflow.platform.je.policies.heatmap import Heatmap


def _csv(kind: type) -> object:
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def serve_cmd(model: str, port: int, kv: str, extra: list[str]) -> list[str]:
    return [str(DEEPFLOW), "serve", "--model", model, "--port", str(port), "--kv-cache-memory", kv, *extra]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tes", type=int, default=2, help="colocated TEs of the colocated deployment")
    p.add_argument("--pd", default="1:1", help="P:D of the disaggregated deployment")
    p.add_argument("--prefill-lengths", type=_csv(int), default=DEFAULT_PREFILL_LENGTHS)
    p.add_argument("--ratios", type=_csv(float), default=DEFAULT_RATIOS)
    p.add_argument("--rps", type=_csv(float), default=DEFAULT_RPS)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--port", type=int, default=8320)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pd_heatmap")
    p.add_argument("--sequential", action="store_true", help="one server at a time")
    args = p.parse_args()
    if args.model is None:
        from deepflow.weights.embedded import prepare_embedded_model

        args.model = str(prepare_embedded_model(progress=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    co_cmd = serve_cmd(args.model, args.port, args.kv_cache_memory, ["--tes", str(args.tes)])
    pd_cmd = serve_cmd(args.model, args.port + 1, args.kv_cache_memory, ["--pd", args.pd])
    logs = args.out.parent

    def config(co_url: str, pd_url: str, model: str) -> PDHeatmapConfig:
        return PDHeatmapConfig(
            colocated_url=co_url,
            disaggregated_url=pd_url,
            model=model,
            prefill_lengths=args.prefill_lengths,
            ratios=args.ratios,
            rps=args.rps,
            num_prompts=args.num_prompts,
            seed=args.seed,
            tokenizer=args.model,
            progress=True,
        )

    if not args.sequential:
        with (
            Server(co_cmd, args.port, logs / "pd_heatmap_colocated.log", args.startup_timeout) as co,
            Server(pd_cmd, args.port + 1, logs / "pd_heatmap_disaggregated.log", args.startup_timeout) as pd,
        ):
            result = asyncio.run(run_pd_heatmap(config(co.url, pd.url, co.model_name()), on_run=_progress))
    else:
        # Each grid against one live server: the other URL points at the same one, and only its own
        # deployment's runs are kept.
        halves = {}
        for name, cmd, port in (("colocated", co_cmd, args.port), ("disaggregated", pd_cmd, args.port + 1)):
            with Server(cmd, port, logs / f"pd_heatmap_{name}.log", args.startup_timeout) as server:
                log(f"measuring the {name} deployment")
                halves[name] = asyncio.run(
                    run_pd_heatmap(config(server.url, server.url, server.model_name()), on_run=_progress)
                )
        runs = [r for name, half in halves.items() for r in half.runs if r.deployment == name]
        result = _combine(halves["colocated"], runs)
    json_path, png_path = write_outputs(result, args.out)
    print(result.table())
    log(f"wrote {json_path} and {png_path}")
    return 0


def _combine(template: PDHeatmapResult, runs: list) -> PDHeatmapResult:  # type: ignore[type-arg]
    """The heatmap of runs measured in two sessions (one per deployment)."""
    from deepflow.platform.je.policies.heatmap import relative_gain

    h = template.heatmap
    jct = {(r.rps, r.prefill_len, r.ratio, r.deployment): r.jct_mean_s for r in runs}
    grids = {
        rps: [
            [
                relative_gain(jct.get((rps, p, q, "colocated")), jct.get((rps, p, q, "disaggregated")))
                for q in h.ratios
            ]
            for p in h.prefill_lengths
        ]
        for rps in h.rps
    }
    meta = {**h.meta, "sequential": True, "measurements": [r.__dict__ for r in runs]}
    return PDHeatmapResult(Heatmap(h.prefill_lengths, h.ratios, grids, meta), runs)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
