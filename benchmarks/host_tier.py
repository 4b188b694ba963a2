"""The host tier of the Relational Tensor Cache under a working set that does not fit the device KV pool.

Reproduce (the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/host_tier.py

Full form:

    python benchmarks/host_tier.py [--prefixes 12] [--prefix-len 1024] [--suffix-len 32] [--output-len 16]
        [--rounds 4] [--warmup-rounds 1] [--concurrency 3] [--small-kv-fraction 0.4] [--big-kv 1GiB]
        [--host-cache-memory 1GiB] [--configs a b c] [--port 8300] [--model PATH] [--dtype bfloat16]
        [--max-model-len 2048] [--seed 0] [--out-dir DIR]

Workload: P distinct prefixes of `prefix-len` tokens; every request is one prefix followed by its own unique
`suffix-len`-token suffix and asks for exactly `output-len` tokens (greedy, ignore_eos, streamed to
/v1/completions as token ids, so lengths are exact). Requests go round-robin over the prefixes (request i
uses prefix i mod P), `rounds` times over, in a closed loop of `concurrency` workers. With an LRU device pool
smaller than the P prefixes, a prefix is always evicted before its next turn comes, so the device pool alone
never hits.

Configurations, one `deepflow serve` at a time on 127.0.0.1 (never two at once):
  a  everything fits on the device: --kv-cache-memory BIG_KV (1GiB), --host-cache-memory HOST
  b  device pool of SMALL_KV_FRACTION (0.4) of the working set, --host-cache-memory HOST (1GiB)
  c  the same small device pool, --host-cache-memory 0 (evicted blocks are dropped)
The working set is P x (prefix + suffix + output) tokens x the KV bytes per token (30 layers x 2 x 3 KV
heads x 64 x 2 bytes = 23,040 B for SmolLM2-135M in bf16), printed with the results.

Per server: start, wait for /health, one short smoke completion, then `warmup-rounds` rounds (not measured:
they fill the cache; every first use of a prefix is a miss in every configuration), then the measured rounds.
GET /metrics is scraped before and after the measured rounds; the table shows the differences.

Reported per configuration (measured rounds only):
  hit rate      sum(usage.prompt_tokens_details.cached_tokens) / sum(usage.prompt_tokens)
  TTFT          mean / p50 / p99, ms (client side, streaming)
  throughput    requests/s and output tokens/s over the measured rounds' wall time
  metrics       vllm:prefix_cache_hits / vllm:prefix_cache_queries (tokens), deepflow:prefix_cache_hits_host
                (tokens), deepflow:kv_blocks_evicted, deepflow:host_kv_blocks_evicted,
                deepflow:kv_populate_latency_seconds (count and mean)
Targets checked at the end: hit rate of b >= 80% of a's, and b faster (mean TTFT and throughput) than c.

The requests are driven by deepflow's load generator client (`deepflow.bench.client.stream_request`) and
aggregated by its report (`deepflow.bench.report.summarize`); `deepflow bench serve` itself has no dataset
with several prefixes, so this script builds its prompts from the same one-token word pool.
Output: a Markdown table on stdout, and OUT_DIR/host_tier.json (+ OUT_DIR/summary.md, server logs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from deepflow.bench.client import RequestRecord, completions_payload, stream_request
from deepflow.bench.datasets import rng_for
from deepflow.bench.report import Summary, summarize
from deepflow.bench.tokens import build_word_pool, resolve_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEEPFLOW = ROOT / ".venv" / "bin" / "deepflow"
KV_BYTES_PER_TOKEN_SMOLLM2_BF16 = 30 * 2 * 3 * 64 * 2  # layers x (K, V) x KV heads x head dim x bytes
METRICS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "deepflow:prefix_cache_hits_host_total",
    "deepflow:kv_blocks_evicted_total",
    "deepflow:host_kv_blocks_evicted_total",
    "deepflow:kv_populate_latency_seconds_count",
    "deepflow:kv_populate_latency_seconds_sum",
    "vllm:num_preemptions_total",
)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B?)\s*", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '0' or bytes -> bytes (same spellings as `deepflow serve`)."""
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def log(message: str) -> None:
    print(f"[host_tier {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- workload ------------------------------------------------------------------------------------------
def build_prompts(args: argparse.Namespace, model_dir: str) -> list[list[int]]:
    """rounds x P prompts in send order: round r, prefix p -> prefixes[p] + a suffix unique to (r, p)."""
    tokenizer = resolve_tokenizer(model_dir, "http://127.0.0.1:1", "unused")
    pool = build_word_pool(tokenizer)
    rng = rng_for(args.seed, 0)
    prefixes = [pool.token_ids(pool.draw(rng, args.prefix_len)) for _ in range(args.prefixes)]
    if len({tuple(p[:16]) for p in prefixes}) != len(prefixes):
        raise SystemExit("two prefixes share their first block; pick another --seed")
    prompts = []
    for _ in range(args.rounds):
        for prefix in prefixes:
            prompts.append(prefix + pool.token_ids(pool.draw(rng, args.suffix_len)))
    return prompts


async def closed_loop(
    base_url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int, first_index: int
) -> tuple[list[RequestRecord], float]:
    """Send `prompts` in order with `concurrency` workers (each sends its next when its last one ends)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    records: list[RequestRecord] = []
    queue = iter(enumerate(prompts))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            for i, prompt in queue:
                record = RequestRecord(first_index + i, first_index + i, 0, len(prompt))
                record.start_s = time.perf_counter() - t0
                payload = completions_payload(model, prompt, output_len, 0.0, True)
                await stream_request(client, "/v1/completions", payload, record, 600.0)
                records.append(record)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    return records, duration


# ---- server --------------------------------------------------------------------------------------------
class Server:
    """`deepflow serve` in its own process group; stop() sends SIGTERM, then SIGKILL after 30 s."""

    def __init__(self, cmd: list[str], port: int, logfile: Path, timeout: float) -> None:
        self.cmd, self.port, self.logfile, self.timeout = cmd, port, logfile, timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"
        self.cold_start_s: float | None = None

    def __enter__(self) -> Server:
        with httpx.Client() as probe:
            try:
                probe.get(self.url + "/health", timeout=1.0)
                raise SystemExit(f"port {self.port} already answers: stop that server or pass --port")
            except httpx.HTTPError:
                pass
        log(f"starting: {' '.join(self.cmd)}")
        t0 = time.perf_counter()
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        with httpx.Client() as probe:
            while True:
                if self.proc.poll() is not None:
                    tail = self.logfile.read_text(errors="replace").splitlines()[-30:]
                    raise SystemExit("server exited before /health answered:\n" + "\n".join(tail))
                try:
                    if probe.get(self.url + "/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > self.timeout:
                    self.stop()
                    raise SystemExit(f"no /health 200 within {self.timeout:g} s")
                time.sleep(0.2)
        self.cold_start_s = time.perf_counter() - t0
        log(f"healthy after {self.cold_start_s:.1f} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own process group
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("server ignored SIGTERM for 30 s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # whatever is left of the group
        self.proc.wait()

    def metrics(self) -> dict[str, float]:
        """The METRICS counters (summed over labels); a missing one is absent from the result."""
        text = httpx.get(self.url + "/metrics", timeout=30.0).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in METRICS:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return values

    def model_name(self) -> str:
        return httpx.get(self.url + "/v1/models", timeout=30.0).json()["data"][0]["id"]


# ---- one configuration ---------------------------------------------------------------------------------
def run_config(
    name: str,
    kv: int,
    host: int,
    args: argparse.Namespace,
    model_dir: str,
    prompts: list[list[int]],
    out: Path,
) -> dict[str, Any]:
    cmd = [
        str(DEEPFLOW),
        "serve",
        "--model",
        model_dir,
        "--dtype",
        args.dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--max-model-len",
        str(args.max_model_len),
        "--kv-cache-memory",
        str(kv),
        "--host-cache-memory",
        str(host),
    ]
    per_round = args.prefixes
    warm = prompts[: args.warmup_rounds * per_round]
    measured = prompts[args.warmup_rounds * per_round :]
    with Server(cmd, args.port, out / f"server_{name}.log", args.startup_timeout) as server:
        model = server.model_name()
        smoke = httpx.post(
            server.url + "/v1/completions",
            json={"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
            timeout=120.0,
        )
        smoke.raise_for_status()
        warm_records: list[RequestRecord] = []
        if warm:
            log(f"{name}: {len(warm)} warm-up requests ({args.warmup_rounds} round(s), not measured)")
            warm_records, _ = asyncio.run(
                closed_loop(server.url, model, warm, args.output_len, args.concurrency, 0)
            )
        before = server.metrics()
        log(f"{name}: {len(measured)} measured requests")
        records, duration = asyncio.run(
            closed_loop(server.url, model, measured, args.output_len, args.concurrency, len(warm))
        )
        after = server.metrics()
        cold_start = server.cold_start_s
    summary: Summary = summarize(records, duration, warm_records)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    missing = [k for k in METRICS if k not in after]
    ok = [r for r in records if r.success]
    prompt_tokens = sum(r.prompt_tokens or r.prompt_len for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    populates = delta.get("deepflow:kv_populate_latency_seconds_count", 0.0)
    per_prefix_round = []  # cached tokens of each measured request, in send order (to spot patterns)
    for r in records:
        per_prefix_round.append(r.cached_tokens if r.success else None)
    return {
        "name": name,
        "kv_cache_memory": kv,
        "host_cache_memory": host,
        "command": " ".join(cmd),
        "cold_start_s": cold_start,
        "hit_rate": cached / prompt_tokens if prompt_tokens else None,
        "cached_tokens": cached,
        "prompt_tokens": prompt_tokens,
        "warmup_failed": sum(not r.success for r in warm_records),
        "warmup_hit_rate": (
            sum(r.cached_tokens or 0 for r in warm_records if r.success)
            / max(sum(r.prompt_tokens or r.prompt_len for r in warm_records if r.success), 1)
            if warm_records
            else None
        ),
        "metrics_delta": delta,
        "metrics_missing": missing,
        "metrics_hit_rate": (
            delta["vllm:prefix_cache_hits_total"] / delta["vllm:prefix_cache_queries_total"]
            if delta.get("vllm:prefix_cache_queries_total")
            else None
        ),
        "populate_mean_ms": (
            1e3 * delta.get("deepflow:kv_populate_latency_seconds_sum", 0.0) / populates
            if populates
            else None
        ),
        "cached_per_request": per_prefix_round,
        "summary": asdict(summary),
        "requests": [r.to_dict() for r in records],
    }


# ---- report --------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| config | device KV | host tier | hit rate | TTFT mean (ms) | TTFT p50 (ms) | TTFT p99 (ms) "
        "| req/s | out tok/s | failed | host-hit tokens | device blocks evicted | host blocks dropped "
        "| populates | populate mean (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, d = r["summary"], r["metrics_delta"]
        ttft = s["ttft_ms"] or {}

        def m(key: str, d: dict[str, float] = d) -> str:
            return _f(d.get(key), 0) if key in d else "n/a"

        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"],
                    f"{r['kv_cache_memory'] / 2**20:.0f} MiB",
                    f"{r['host_cache_memory'] / 2**20:.0f} MiB",
                    "n/a" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}",
                    _f(ttft.get("mean")),
                    _f(ttft.get("p50")),
                    _f(ttft.get("p99")),
                    _f(s["request_throughput"], 2),
                    _f(s["output_throughput"]),
                    str(s["failed"]),
                    m("deepflow:prefix_cache_hits_host_total"),
                    m("deepflow:kv_blocks_evicted_total"),
                    m("deepflow:host_kv_blocks_evicted_total"),
                    m("deepflow:kv_populate_latency_seconds_count"),
                    _f(r["populate_mean_ms"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in results}
    out = []
    if "a" in by and "b" in by and by["a"]["hit_rate"] and by["b"]["hit_rate"] is not None:
        ratio = by["b"]["hit_rate"] / by["a"]["hit_rate"]
        out.append(
            f"hit rate b / a = {by['b']['hit_rate']:.3f} / {by['a']['hit_rate']:.3f} = {ratio:.2f} "
            f"(target >= 0.80: {'met' if ratio >= 0.8 else 'MISSED'})"
        )
    if "b" in by and "c" in by:
        tb, tc = (by[k]["summary"]["ttft_ms"] for k in ("b", "c"))
        qb, qc = (by[k]["summary"]["request_throughput"] for k in ("b", "c"))
        if tb and tc:
            faster = tb["mean"] < tc["mean"] and qb > qc
            out.append(
                f"b vs c: mean TTFT {tb['mean']:.1f} vs {tc['mean']:.1f} ms "
                f"({tc['mean'] / tb['mean']:.2f}x lower), "
                f"throughput {qb:.2f} vs {qc:.2f} req/s ({qb / qc:.2f}x) "
                f"(target b faster than c: {'met' if faster else 'MISSED'})"
            )
    for r in results:
        if r["summary"]["failed"] or r["warmup_failed"]:
            out.append(
                f"WARNING: config {r['name']}: {r['summary']['failed']} measured and "
                f"{r['warmup_failed']} warm-up requests failed: {r['summary']['errors']}"
            )
        if r["metrics_missing"]:
            out.append(f"WARNING: config {r['name']}: /metrics lacks {', '.join(r['metrics_missing'])}")
        mh, h = r["metrics_hit_rate"], r["hit_rate"]
        if mh is not None and h is not None and abs(mh - h) > 0.01:
            out.append(
                f"NOTE: config {r['name']}: /metrics hit rate {mh:.3f} differs from the responses' "
                f"cached_tokens {h:.3f}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--prefixes", type=int, default=12, help="P distinct shared prefixes")
    p.add_argument("--prefix-len", type=int, default=1024, help="tokens per prefix")
    p.add_argument("--suffix-len", type=int, default=32, help="unique tokens after the prefix")
    p.add_argument("--output-len", type=int, default=16, help="max_tokens (ignore_eos) per request")
    p.add_argument("--rounds", type=int, default=4, help="passes over the P prefixes, warm-up included")
    p.add_argument("--warmup-rounds", type=int, default=1, help="leading rounds left out of the numbers")
    p.add_argument("--concurrency", type=int, default=3, help="closed-loop workers")
    p.add_argument(
        "--small-kv-fraction",
        type=float,
        default=0.4,
        help="device KV pool of b and c, as a fraction of the working set",
    )
    p.add_argument("--big-kv", type=parse_size, default=parse_size("1GiB"), help="device KV pool of a")
    p.add_argument(
        "--host-cache-memory", type=parse_size, default=parse_size("1GiB"), help="host tier of a, b"
    )
    p.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=KV_BYTES_PER_TOKEN_SMOLLM2_BF16,
        help="sizes the working set (default: SmolLM2-135M in bf16)",
    )
    p.add_argument("--configs", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"])
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/host-tier-DATE")
    args = p.parse_args(argv)
    if args.rounds <= args.warmup_rounds:
        p.error("--rounds must exceed --warmup-rounds")
    if args.dtype != "bfloat16" and args.kv_bytes_per_token == KV_BYTES_PER_TOKEN_SMOLLM2_BF16:
        args.kv_bytes_per_token *= 2

    if args.model is None:
        from deepflow.weights.embedded import prepare_embedded_model

        args.model = str(prepare_embedded_model(progress=False))
    out = args.out_dir or ROOT / "benchmarks" / "results" / f"host-tier-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)

    tokens_per_request = args.prefix_len + args.suffix_len + args.output_len
    working_set = args.prefixes * tokens_per_request * args.kv_bytes_per_token
    small_kv = int(working_set * args.small_kv_fraction)
    configs = {
        "a": (args.big_kv, args.host_cache_memory),
        "b": (small_kv, args.host_cache_memory),
        "c": (small_kv, 0),
    }
    prompts = build_prompts(args, args.model)
    load = Path("/proc/loadavg").read_text().split()[0]
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load} at start; "
        f"{args.prefixes} prefixes x {args.prefix_len} tokens, suffix {args.suffix_len}, output "
        f"{args.output_len}, {args.rounds} rounds ({args.warmup_rounds} warm-up), concurrency "
        f"{args.concurrency}, {args.dtype}; working set {working_set / 2**20:.1f} MiB "
        f"({args.prefixes} x {tokens_per_request} tokens x {args.kv_bytes_per_token} B); small device pool "
        f"{small_kv / 2**20:.1f} MiB ({args.small_kv_fraction:g} of it)"
    )
    log(header)
    results = []
    for name in args.configs:
        kv, host = configs[name]
        results.append(run_config(name, kv, host, args, args.model, prompts, out))
        log(f"{name}: hit rate {results[-1]['hit_rate']}, TTFT mean {results[-1]['summary']['ttft_ms']}")
    text = "\n".join([header, "", table(results), "", *verdict(results)]) + "\n"
    (out / "summary.md").write_text(text)
    doc = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "working_set_bytes": working_set,
        "small_kv_bytes": small_kv,
        "results": results,
    }
    (out / "host_tier.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(text, end="")
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
