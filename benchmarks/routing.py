"""Routing policies of a two-TE group under a multi-turn chat workload: prefix hit rate and TTFT.

Reproduce (the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/routing.py

Full form:

    python benchmarks/routing.py [--policies round_robin least_load locality combined] [--tes 2]
        [--conversations 10] [--turns 6] [--prefix-len 256] [--input-len 128] [--output-len 64]
        [--concurrency 5] [--rounds 2] [--kv-cache-memory 256MiB] [--port 8310] [--model PATH] [--seed 0]
        [--startup-timeout 180] [--out-dir DIR]

`deepflow serve --tes N --policy P` runs the platform (cluster manager, one job executor, N task executors);
each TE has its own prefix cache, so the policy decides which TE sees a conversation's earlier turns. For
each policy in turn (`rounds` sweeps, the order rotated each sweep so no policy always follows the same
one), one server at a time on 127.0.0.1: start it, wait for /health, send one short smoke completion,
scrape /metrics, run the multi-turn workload with deepflow's load generator
(`deepflow.bench.serve.run_benchmark`, the API behind `deepflow bench serve --dataset multi-turn`), scrape
/metrics and the JE's routing reasons (/v1/cluster), stop the server (SIGTERM, wait).

Workload (the same prompts for every policy, from --seed): `conversations` chat conversations of `turns`
requests each; all share one system prompt of `prefix-len` tokens, every user turn is `input-len` tokens,
every answer exactly `output-len` tokens (greedy, ignore_eos), and turn t+1 carries the whole history.
`concurrency` conversations are in flight at a time (closed loop).

Reported per policy:
  hit rate      vllm:prefix_cache_hits / vllm:prefix_cache_queries, /metrics difference (tokens; the group's
                counters are the sum over its TEs); the client-side cached/prompt fraction is in the JSON
  TTFT          mean and p99, ms (client side, streaming)
  tok/s         output tokens per second over the run's wall time
  vs RR         mean TTFT / round_robin's mean TTFT of the same sweep (< 1: faster than round-robin)
  reasons       why the JE picked each TE (prefix_match, low_match, imbalanced, hot_spot, ...), summed
Output: a Markdown table on stdout, OUT_DIR/routing.json (every request) and OUT_DIR/summary.md, server logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deepflow.bench.config import BenchConfig
from deepflow.bench.serve import run_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server, parse_size  # same server handling

POLICIES = ("round_robin", "least_load", "locality", "combined")
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


def log(message: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics whose name starts with vllm: or deepflow:, summed over labels."""
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30.0).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(("vllm:", "deepflow:")) and not name.endswith(("_bucket", "_created")):
            with contextlib.suppress(ValueError):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def routing_reasons(url: str) -> dict[str, int]:
    """The JE's routing decisions so far, by reason, summed over its models."""
    report = httpx.get(url + "/v1/cluster", timeout=30.0).json()["job_executor"]["routing_reasons"]
    out: dict[str, int] = {}
    for per_model in report.values():
        for reason, count in per_model.items():
            out[reason] = out.get(reason, 0) + count
    return out


def run_policy(policy: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        str(DEEPFLOW),
        "serve",
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--tes",
        str(args.tes),
        "--policy",
        policy,
        "--kv-cache-memory",
        str(args.kv_cache_memory),
    ]
    with Server(cmd, args.port, out / f"server_{policy}.log", args.startup_timeout) as server:
        model = server.model_name()
        smoke = httpx.post(
            server.url + "/v1/completions",
            json={"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
            timeout=120.0,
        )
        smoke.raise_for_status()
        config = BenchConfig(
            base_url=server.url,
            model=model,
            dataset=args.dataset,
            num_prompts=args.conversations,
            num_turns=args.turns,
            prefix_len=args.prefix_len,
            input_len=args.input_len,
            output_len=args.output_len,
            concurrency=None if args.rps else args.concurrency,
            rps=args.rps,
            seed=args.seed,
            tokenizer=args.model,
            label=policy,
        )
        if args.prime:
            primer = dataclasses.replace(config, num_prompts=args.prime, concurrency=1, rps=None)
            asyncio.run(run_benchmark(primer))
        load = f"rps={args.rps}" if args.rps else f"c={args.concurrency}"
        log(f"{policy}: {args.dataset}, {args.conversations} conversations x {args.turns} turns, {load}")
        before = scrape(server.url)
        reasons_before = routing_reasons(server.url)
        t0 = time.perf_counter()
        result = asyncio.run(run_benchmark(config))
        wall = time.perf_counter() - t0
        after = scrape(server.url)
        cold_start = server.cold_start_s
        reasons = {
            reason: count - reasons_before.get(reason, 0)
            for reason, count in routing_reasons(server.url).items()
            if count > reasons_before.get(reason, 0)
        }
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    s = result.summary
    queries = delta.get(QUERIES)
    return {
        "policy": policy,
        "command": " ".join(cmd),
        "cold_start_s": cold_start,
        "bench_wall_s": wall,
        "hit_rate": delta[HITS] / queries if queries else None,
        "client_hit_rate": s.cache_hit_fraction,
        "ttft_mean_ms": s.ttft_ms.mean if s.ttft_ms else None,
        "ttft_p99_ms": s.ttft_ms.p99 if s.ttft_ms else None,
        "output_throughput": s.output_throughput,
        "failed": s.failed,
        "errors": s.errors,
        "routing_reasons": reasons,
        "metrics_delta": delta,
        "bench": result.to_dict(),
    }


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def table(results: list[dict[str, Any]]) -> str:
    """One row per policy: means over the rounds; "vs RR" per round (that round's round-robin)."""
    rounds = sorted({r["round"] for r in results})
    rr = {r["round"]: r["ttft_mean_ms"] for r in results if r["policy"] == "round_robin"}
    lines = [
        "| policy | hit rate | TTFT mean (ms) | TTFT p99 (ms) | out tok/s | TTFT mean vs RR (per round) "
        "| routing reasons | failed |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for policy in dict.fromkeys(r["policy"] for r in results):
        runs = [r for r in results if r["policy"] == policy]
        ratios = [
            r["ttft_mean_ms"] / rr[r["round"]]
            for r in runs
            if rr.get(r["round"]) and r["ttft_mean_ms"] is not None
        ]
        reasons: dict[str, int] = {}
        for r in runs:
            for reason, count in r["routing_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        hit = _mean([r["hit_rate"] for r in runs])
        ttft, p99 = _mean([r["ttft_mean_ms"] for r in runs]), _mean([r["ttft_p99_ms"] for r in runs])
        tok_s = _mean([r["output_throughput"] for r in runs])
        lines.append(
            f"| {policy} | {'n/a' if hit is None else f'{hit:.3f}'} | {_f(ttft)} | {_f(p99)} | {_f(tok_s)} "
            f"| {' / '.join(f'{x:.2f}' for x in ratios) or 'n/a'} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))} "
            f"| {sum(r['failed'] for r in runs)} |"
        )
    if len(rounds) > 1:
        lines.append("")
        lines.append(f"({len(rounds)} rounds, policy order rotated each round)")
    return "\n".join(lines)


def notes(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for round_ in sorted({r["round"] for r in results}):
        by = {r["policy"]: r for r in results if r["round"] == round_}
        if "combined" in by and "round_robin" in by:
            c, rr = by["combined"]["ttft_mean_ms"], by["round_robin"]["ttft_mean_ms"]
            if c is not None and rr is not None:
                verdict = "met" if c < rr else "MISSED"
                out.append(
                    f"round {round_}: combined vs round_robin mean TTFT: {c:.1f} vs {rr:.1f} ms "
                    f"(target lower: {verdict})"
                )
    for r in results:
        if r["failed"]:
            out.append(f"WARNING: {r['policy']}: {r['failed']} requests failed: {r['errors']}")
        ch, mh = r["client_hit_rate"], r["hit_rate"]
        if ch is not None and mh is not None and abs(ch - mh) > 0.02:
            out.append(f"note: {r['policy']}: client-side cached fraction {ch:.3f} vs /metrics {mh:.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--tes", type=int, default=2, help="task executors per server")
    p.add_argument(
        "--dataset",
        default="multi-turn",
        choices=["multi-turn", "shared-prefix"],
        help="shared-prefix: every request starts with one prefix of --prefix-len (a hot prefix)",
    )
    p.add_argument("--conversations", type=int, default=10, help="conversations (shared-prefix: requests)")
    p.add_argument(
        "--prime",
        type=int,
        default=0,
        help="first send this many of the workload's requests one at a time, unmeasured: the prefix is then "
        "cached on one TE only, as when a burst follows the first requests of a new prompt",
    )
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--prefix-len", type=int, default=256, help="tokens of the shared system prompt")
    p.add_argument("--input-len", type=int, default=128, help="tokens of every user turn")
    p.add_argument("--output-len", type=int, default=64, help="tokens of every answer")
    p.add_argument("--concurrency", type=int, default=5, help="conversations in flight (closed loop)")
    p.add_argument(
        "--rps", type=float, default=None, help="open loop instead: conversations start at this Poisson rate"
    )
    p.add_argument("--kv-cache-memory", type=parse_size, default=parse_size("256MiB"), help="per TE")
    p.add_argument("--port", type=int, default=8310)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="sweeps over the policies, order rotated each time")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/routing-DATE")
    args = p.parse_args()
    if args.model is None:
        from deepflow.weights.embedded import prepare_embedded_model

        args.model = str(prepare_embedded_model(progress=False))
    out = args.out_dir or ROOT / "benchmarks" / "results" / f"routing-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for round_ in range(args.rounds):
        shift = round_ % len(args.policies)
        for policy in args.policies[shift:] + args.policies[:shift]:
            results.append({"round": round_, **run_policy(policy, args, out)})
            r = results[-1]
            log(f"{policy}: hit rate {r['hit_rate']}, TTFT {r['ttft_mean_ms']} ms, {r['bench_wall_s']:.1f} s")
    work = (
        f"{args.conversations} requests after one shared {args.prefix_len}-token prefix, prompts "
        if args.dataset == "shared-prefix"
        else f"{args.conversations} conversations x {args.turns} turns, system prompt {args.prefix_len}, "
        "user turns "
    )
    header = (
        f"{args.tes} TEs; {work}{args.input_len}, output {args.output_len} tokens, "
        + (
            f"conversations starting at {args.rps}/s (open loop)"
            if args.rps
            else f"concurrency {args.concurrency}"
        )
        + f"; --kv-cache-memory {args.kv_cache_memory} per TE"
    )
    text = "\n".join([header, "", table(results), "", *notes(results)]) + "\n"
    (out / "summary.md").write_text(text)
    (out / "routing.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
    )
    print(text)
    log(f"results in {out}")


if __name__ == "__main__":
    main()
