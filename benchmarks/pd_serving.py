"""The paper's Figure 4 on this machine: 1P+1D vs 2 colocated TEs over RPS, on a mixed workload.

Reproduce (writes benchmarks/results/pd_serving.{json,md,png}; the numbers in docs/benchmarks.md):

    .venv/bin/python benchmarks/pd_serving.py [--rps 0.5,1,2] [--num-prompts 24] [--port 8340]

The workload mixes the two shapes disaggregation is about, alternating: *long prompt, short answer*
(`--long-in` tokens in, `--short-out` out) and *short prompt, long answer* (`--short-in` in, `--long-out`
out), open loop (Poisson arrivals, one seeded stream per RPS: both deployments get the same prompts at the
same offsets), `ignore_eos`, greedy. One deployment runs at a time — `deepflow serve --tes 2`, then
`deepflow serve --pd 1:1` — so the two never compete for the cores. Per RPS and deployment: TTFT, TPOT and
JCT (end-to-end latency) mean and p99, overall and per shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server, log  # same server handling

from deepflow.bench.client import RequestRecord, completions_payload, stream_request
from deepflow.bench.clock import SYSTEM_CLOCK
from deepflow.bench.datasets import random_dataset, rng_for
from deepflow.bench.report import percentile
from deepflow.bench.tokens import build_word_pool, resolve_tokenizer

DEPLOYMENTS = {"colocated": ["--tes", "2"], "disaggregated": ["--pd", "1:1"]}


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x.strip())


def workload(pool, n: int, seed: int, stream: int, a) -> list[tuple[str, list[int], int]]:
    longs = random_dataset(pool, n, a.long_in, seed, as_text=False, stream=stream)
    shorts = random_dataset(pool, n, a.short_in, seed, as_text=False, stream=stream + 1)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(("long_prompt", list(longs[i].turns[0].prompt), a.short_out))
        else:
            out.append(("long_answer", list(shorts[i].turns[0].prompt), a.long_out))
    return out


async def open_loop(url: str, model: str, reqs, arrivals, timeout: float) -> list[tuple[str, RequestRecord]]:
    clock = SYSTEM_CLOCK
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout),
                                 limits=httpx.Limits(max_connections=None)) as client:  # fmt: skip
        t0 = clock.now()
        records = [(shape, RequestRecord(i, i, 0, len(p))) for i, (shape, p, _) in enumerate(reqs)]

        async def one(record: RequestRecord, prompt: list[int], decode: int) -> None:
            record.start_s = clock.now() - t0
            payload = completions_payload(model, prompt, decode, temperature=0.0, ignore_eos=True)
            await stream_request(client, "/v1/completions", payload, record, timeout, clock)

        tasks = []
        for (_, record), (_, prompt, decode), at in zip(records, reqs, arrivals, strict=True):
            await clock.sleep_until(t0 + at)
            tasks.append(asyncio.create_task(one(record, prompt, decode)))
        await asyncio.gather(*tasks)
    return records


def summarize(records) -> dict:
    def stats(rs):
        ok = [r for r in rs if r.success]
        out = {"completed": len(ok), "failed": len(rs) - len(ok)}
        for name, xs in (
            ("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
            ("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]),
            ("jct", [r.e2e_s for r in ok if r.e2e_s is not None]),
        ):
            out[f"{name}_mean_s"] = sum(xs) / len(xs) if xs else None
            out[f"{name}_p99_s"] = percentile(xs, 99) if xs else None
        return out

    result = {"all": stats([r for _, r in records])}
    for shape in ("long_prompt", "long_answer"):
        result[shape] = stats([r for s, r in records if s == shape])
    return result


def plot(results: dict, rps: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, title in zip(axes, ("ttft", "tpot", "jct"), ("TTFT", "TPOT", "JCT"), strict=True):
        for d, style in (("colocated", "o-"), ("disaggregated", "s--")):
            ys = [results[d][str(r)]["all"][f"{metric}_mean_s"] for r in rps]
            ax.plot(rps, [y * 1e3 if y is not None else float("nan") for y in ys], style, label=d)
        ax.set_xlabel("RPS")
        ax.set_ylabel(f"mean {title} (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("2 colocated TEs vs 1P+1D, mixed workload (SmolLM2-135M, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict, rps: tuple[float, ...]) -> str:
    lines = [
        "| RPS | deployment | TTFT mean / p99 (ms) | TPOT mean / p99 (ms) | JCT mean / p99 (s) "
        "| long-prompt JCT (s) | long-answer JCT (s) | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}"

    def s(x):
        return "-" if x is None else f"{x:.2f}"

    for r in rps:
        for d in DEPLOYMENTS:
            res = results[d][str(r)]
            a = res["all"]
            lines.append(
                f"| {r:g} | {d} | {ms(a['ttft_mean_s'])} / {ms(a['ttft_p99_s'])} | {ms(a['tpot_mean_s'])} / "
                f"{ms(a['tpot_p99_s'])} | {s(a['jct_mean_s'])} / {s(a['jct_p99_s'])} | "
                f"{s(res['long_prompt']['jct_mean_s'])} | {s(res['long_answer']['jct_mean_s'])} | "
                f"{a['failed']} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rps", type=_csv(float), default=(0.5, 1.0, 2.0))
    p.add_argument("--num-prompts", type=int, default=24, help="requests per RPS and deployment")
    p.add_argument("--long-in", type=int, default=768)
    p.add_argument("--short-out", type=int, default=16)
    p.add_argument("--short-in", type=int, default=64)
    p.add_argument("--long-out", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--port", type=int, default=8340)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pd_serving")
    a = p.parse_args()
    if a.model is None:
        from deepflow.weights.embedded import prepare_embedded_model

        a.model = str(prepare_embedded_model(progress=False))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer(a.model, "", "")
    pool = build_word_pool(tokenizer)
    plans = {}
    for k, r in enumerate(a.rps):
        reqs = workload(pool, a.num_prompts, a.seed, 100 + 4 * k, a)
        gaps = rng_for(a.seed, 101 + 4 * k).exponential(1.0 / r, size=a.num_prompts)
        gaps[0] = 0.0
        plans[r] = (reqs, gaps.cumsum().tolist())
    results: dict = {}
    for d, flags in DEPLOYMENTS.items():
        cmd = [str(DEEPFLOW), "serve", "--model", a.model, "--port", str(a.port), "--kv-cache-memory",
               a.kv_cache_memory, *flags]  # fmt: skip
        with Server(cmd, a.port, a.out.with_name(f"pd_serving-{d}.log"), a.startup_timeout) as server:
            name = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
            # Warm-up: a few requests of each shape, unmeasured.
            warm = workload(pool, 4, a.seed, 90, a)
            asyncio.run(open_loop(server.url, name, warm, [0.0] * len(warm), a.timeout))
            results[d] = {}
            for r in a.rps:
                reqs, arrivals = plans[r]
                records = asyncio.run(open_loop(server.url, name, reqs, arrivals, a.timeout))
                results[d][str(r)] = summarize(records)
                log(f"{d} rps {r:g}: {json.dumps(results[d][str(r)]['all'])}")
    md = table(results, a.rps)
    a.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                      "results": results}, indent=2))  # fmt: skip
    a.out.with_suffix(".md").write_text(md + "\n")
    plot(results, a.rps, a.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
