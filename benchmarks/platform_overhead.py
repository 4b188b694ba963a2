"""What the platform's extra hop costs: `deepflow serve` (launcher, cluster manager, one job executor, one
TE) against `deepflow serve --standalone` (one HTTP process over one engine process, the plain server of
the server issue), on the serving benchmark of that issue.

Reproduce (the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/platform_overhead.py

Full form:

    python benchmarks/platform_overhead.py [--concurrency 1 16] [--rounds 2] [--input-len 256]
        [--output-len 128] [--ports 8410 8420] [--model PATH] [--out-dir DIR]

Both servers run at once (an idle one costs a heartbeat a second) so the load can alternate between them:
for each concurrency C, `rounds` times, standalone then platform, the same prompts (seed C) through
`deepflow.bench.serve.run_benchmark` (the API of `deepflow bench serve --dataset random --input-len 256
--output-len 128 --concurrency C --num-prompts max(8, 4C)`, streaming, ignore_eos). Alternating cancels most
drift of a shared machine; the table reports each server's mean over its rounds and the ratio.
Output: a Markdown table on stdout and OUT_DIR/platform_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deepflow.bench.config import BenchConfig
from deepflow.bench.serve import run_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server  # same server handling


def log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def one_run(
    server: Server, model: str, args: argparse.Namespace, concurrency: int, label: str
) -> dict[str, Any]:
    config = BenchConfig(
        base_url=server.url,
        model=model,
        dataset="random",
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=max(8, 4 * concurrency),
        concurrency=concurrency,
        seed=concurrency,
        tokenizer=args.model,
        label=label,
    )
    s = asyncio.run(run_benchmark(config)).summary
    return {
        "server": label,
        "concurrency": concurrency,
        "output_throughput": s.output_throughput,
        "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else None,
        "tpot_p50_ms": s.tpot_ms.p50 if s.tpot_ms else None,
        "failed": s.failed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ports", type=int, nargs=2, default=[8410, 8420])
    p.add_argument("--model", default=None)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "platform_overhead")
    args = p.parse_args()
    if args.model is None:
        from deepflow.weights.embedded import prepare_embedded_model

        args.model = str(prepare_embedded_model(progress=False))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = ["serve", "--model", args.model, "--host", "127.0.0.1"]
    commands = {
        "standalone": [str(DEEPFLOW), *common, "--port", str(args.ports[0]), "--standalone"],
        "platform": [str(DEEPFLOW), *common, "--port", str(args.ports[1])],
    }
    runs: list[dict[str, Any]] = []
    with (
        Server(commands["standalone"], args.ports[0], args.out_dir / "standalone.log", 300) as standalone,
        Server(commands["platform"], args.ports[1], args.out_dir / "platform.log", 300) as platform,
    ):
        servers = {"standalone": standalone, "platform": platform}
        model = standalone.model_name()
        for server in servers.values():  # warm both (first-step allocations, tokenizer caches)
            httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4},
                       timeout=120).raise_for_status()  # fmt: skip
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for label, server in servers.items():
                    log(f"c={concurrency} round {round_ + 1}: {label}")
                    runs.append(one_run(server, model, args, concurrency, label))
    rows = []
    for concurrency in args.concurrency:
        mean = {
            label: {
                key: statistics.fmean(
                    r[key] for r in runs if r["server"] == label and r["concurrency"] == concurrency
                )
                for key in ("output_throughput", "ttft_p50_ms", "tpot_p50_ms")
            }
            for label in commands
        }
        rows.append((concurrency, mean))
    lines = [
        f"{datetime.now():%Y-%m-%d %H:%M}, {args.rounds} alternating rounds per concurrency:",
        "",
        "| concurrency | standalone tok/s | platform tok/s | platform / standalone | TTFT p50 (ms) s / p | "
        "TPOT p50 (ms) s / p |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency, mean in rows:
        s, pl = mean["standalone"], mean["platform"]
        lines.append(
            f"| {concurrency} | {s['output_throughput']:.1f} | {pl['output_throughput']:.1f} | "
            f"{pl['output_throughput'] / s['output_throughput']:.3f} | {s['ttft_p50_ms']:.1f} / "
            f"{pl['ttft_p50_ms']:.1f} | {s['tpot_p50_ms']:.1f} / {pl['tpot_p50_ms']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out_dir / "platform_overhead.json").write_text(
        json.dumps({"commands": commands, "runs": runs, "table": table}, indent=2)
    )


if __name__ == "__main__":
    main()
