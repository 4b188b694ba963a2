"""`deepflow bench serve`: load-test any OpenAI-compatible server (deepflow's or vLLM's) from the shell.

Only argparse and the config are imported here; httpx, numpy and tqdm load when the command runs, so
`deepflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from deepflow.bench.config import DATASETS, ENDPOINTS, BenchConfig

_DESCRIPTION = """\
Stream requests to an OpenAI-compatible server and report TTFT, TPOT, ITL, end-to-end latency and
throughput. Prompts have exact token lengths: token ids for /v1/completions, verified text for chat.
Load: --concurrency N workers (closed loop, default 1), or --rps R Poisson arrivals (open loop; with
--concurrency too, at most N in flight)."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `bench` subcommand to the `deepflow` parser."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_argument_group("target")
    target.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", required=True, help="model name sent in every request")
    target.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    target.add_argument(
        "--endpoint", choices=ENDPOINTS, default=None, help="default: chat for multi-turn, else completions"
    )

    work = p.add_argument_group("workload")
    work.add_argument("--dataset", choices=DATASETS, default="random")
    work.add_argument("--input-len", type=int, required=True, help="tokens per prompt (suffix, user turn)")
    work.add_argument("--output-len", type=int, required=True, help="max_tokens of every request")
    work.add_argument(
        "--num-prompts", type=int, required=True, help="requests (multi-turn: conversations) to send"
    )
    work.add_argument(
        "--prefix-len",
        type=int,
        default=1024,
        help="shared-prefix: tokens of the shared prefix; multi-turn: of the shared system prompt",
    )
    work.add_argument("--num-turns", type=int, default=4, help="multi-turn: requests per conversation")
    work.add_argument("--seed", type=int, default=0, help="prompts and arrival times derive from it")
    work.add_argument(
        "--tokenizer",
        default=None,
        help="HF model folder to build prompts with (default: the server's POST /tokenize, else the "
        "embedded model)",
    )
    work.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the ignore_eos extension so every answer has --output-len tokens",
    )
    work.add_argument("--temperature", type=float, default=0.0)

    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight")
    load.add_argument("--rps", type=float, default=None, help="open loop: Poisson arrivals per second")
    load.add_argument("--warmup", type=int, default=0, help="unmeasured random requests sent first")
    load.add_argument("--timeout", type=float, default=300.0, help="seconds per request (whole stream)")

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, default=None, help="write summary, config and per-request records")
    out.add_argument("--label", default=None, help="name of this run in the table and the JSON")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_bench_serve)
    register_pd_heatmap(sub)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        base_url=args.base_url,
        model=args.model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        prefix_len=args.prefix_len,
        num_turns=args.num_turns,
        seed=args.seed,
        tokenizer=args.tokenizer,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        concurrency=args.concurrency,
        rps=args.rps,
        warmup=args.warmup,
        timeout=args.timeout,
        label=args.label,
        progress=not args.no_progress,
    )


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Print the table; exit 1 when no request succeeded (the server is down or rejects everything)."""
    from deepflow.bench.serve import run_benchmark

    config = config_from_args(args)
    config.validate()
    result = asyncio.run(run_benchmark(config))
    print(result.table())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if result.summary.completed else 1


_PD_HEATMAP_DESCRIPTION = """\
Measure JCT of a colocated and a disaggregated deployment of one model (e.g. `deepflow serve --tes 2` and
`deepflow serve --pd 1:1`) over a grid of prefill length x (decode length / prefill length) at several RPS
(open loop, Poisson; prompts of exact length; ignore_eos with max_tokens = decode length), and write the
heatmap of JCT_coloc / JCT_disagg - 1 (> 0: disaggregated faster) as JSON (the PD-aware router's input,
`router: pd_aware` with `heatmap: PATH`) and as a PNG like the paper's Figure 5."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register_pd_heatmap(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `pd-heatmap` subcommand (deepflow/bench/pd_heatmap.py) to the `deepflow` parser."""

    p = sub.add_parser(
        "pd-heatmap",
        help="measure the colocated-vs-disaggregated JCT heatmap (paper Figure 5)",
        description=_PD_HEATMAP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--colocated-url", required=True, help="server root of the colocated deployment")
    p.add_argument("--disaggregated-url", required=True, help="server root of the disaggregated deployment")
    p.add_argument("--model", required=True, help="model name sent in every request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prefill-lengths", type=_ints, default=(128, 512), help="rows, e.g. 128,512")
    p.add_argument("--ratios", type=_floats, default=(0.03125, 0.125, 0.5), help="columns: decode / prefill")
    p.add_argument("--rps", type=_floats, default=(1.0, 4.0), help="open-loop request rates, e.g. 1,4")
    p.add_argument("--num-prompts", type=int, default=6, help="requests per cell, RPS and deployment")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per deployment first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="HF folder (default: the colocated server's /tokenize)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/pd_heatmap"),
        help="writes OUT.json and OUT.png",
    )
    p.add_argument("--no-progress", action="store_true", help="no line per run on stderr")
    p.set_defaults(func=cmd_pd_heatmap)


def cmd_pd_heatmap(args: argparse.Namespace) -> int:
    from deepflow.bench.pd_heatmap import PDHeatmapConfig, main_run

    config = PDHeatmapConfig(
        colocated_url=args.colocated_url,
        disaggregated_url=args.disaggregated_url,
        model=args.model,
        prefill_lengths=args.prefill_lengths,
        ratios=args.ratios,
        rps=args.rps,
        num_prompts=args.num_prompts,
        seed=args.seed,
        tokenizer=args.tokenizer,
        api_key=args.api_key,
        timeout=args.timeout,
        warmup=args.warmup,
        progress=not args.no_progress,
    )
    config.validate()
    return main_run(config, args.out)
