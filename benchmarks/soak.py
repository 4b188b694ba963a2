"""A bounded soak of `deepflow serve` at saturation with mixed traffic: nothing lost, nothing leaked.

Closed-loop workers (default 24) each pick a kind of traffic at random (seeded) and send it, with a client
timeout, until the duration is over:
- `shared`: chat turns over a few long system prompts (streaming or not); `random`: completions of random
  text;
- `context`: create a context, use it in a chat, delete it, `n2`: completions with n=2 and stop strings,
- `logprobs`: chat with logprobs, `disconnect`: a stream the client drops after a few chunks,
- `malformed`: bad JSON, an unknown model, out-of-range values, a lone surrogate, a 2^70 priority, deeply
  nested JSON, an oversized body; each must be answered 4xx (a 5xx or a dropped connection is an error).

It samples the RSS of every process of the server's tree (launcher, CM, JEs, TEs, tokenizer workers) every
10 s, reads each TE's KV usage from /v1/cluster before the load and after it (once every request has ended
and the soak's contexts are deleted), and prints a verdict: PASS when there was no error but the malformed
requests' expected 4xx, KV usage is back to its idle baseline, and no process grew by 5% or more of its RSS
after warm-up (the first 20% of the run). Exit status 1 on FAIL. Traffic goes to 127.0.0.1 only.

    .venv/bin/python benchmarks/soak.py --serve "--tes 2" --duration 30m
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 5m
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server  # same server handling as the other benchmarks

KINDS = {"shared": 4, "random": 2, "context": 1, "n2": 1, "logprobs": 1, "disconnect": 1, "malformed": 1}
SYSTEMS = [
    f"You are assistant number {i}. " + " ".join(["Answer briefly and politely."] * 40) for i in range(3)
]
RSS_GROWTH_LIMIT = 0.05
WARMUP_FRACTION = 0.2


@dataclass
class Results:
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    tokens_per_minute: Counter[int] = field(default_factory=Counter)
    requests_per_minute: Counter[int] = field(default_factory=Counter)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    kv_baseline: float | None = None
    kv_end: float | None = None
    duration_s: float = 0.0


def errors(results: Results) -> dict[str, int]:
    """Outcomes that are errors: anything but "ok" (for malformed requests, "ok" means answered 4xx)."""
    return {
        f"{kind}: {outcome}": count
        for kind, outcomes in results.outcomes.items()
        for outcome, count in outcomes.items()
        if outcome != "ok"
    }


def rss_growth(samples: list[tuple[float, int]], duration_s: float) -> float | None:
    """RSS at the end over RSS right after warm-up (the first sample past 20% of the run), minus one."""
    after = [rss for t, rss in samples if t >= WARMUP_FRACTION * duration_s]
    if len(after) < 2:
        return None
    return after[-1] / after[0] - 1.0


def verdict(results: Results) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = [f"{count} x {what}" for what, count in errors(results).items()]
    if results.kv_baseline is None or results.kv_end is None:
        reasons.append("KV usage unknown")
    elif results.kv_end > results.kv_baseline + 1e-9:
        reasons.append(f"KV usage {results.kv_end:.4f} at the end vs {results.kv_baseline:.4f} idle")
    for name, samples in results.rss.items():
        growth = rss_growth(samples, results.duration_s)
        if growth is not None and growth >= RSS_GROWTH_LIMIT:
            reasons.append(f"{name} RSS grew {growth:.1%} after warm-up")
    return reasons


# ---- traffic -----------------------------------------------------------------------------------------------
class Traffic:
    def __init__(self, client: httpx.AsyncClient, model: str, max_tokens: int, rng: random.Random) -> None:
        self.client, self.model, self.max_tokens, self.rng = client, model, max_tokens, rng

    def words(self, n: int) -> str:
        return " ".join("".join(self.rng.choices(string.ascii_lowercase, k=5)) for _ in range(n))

    async def post(self, path: str, body: dict[str, Any]) -> tuple[str, int]:
        reply = await self.client.post(path, json=body)
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}", 0
        return "ok", reply.json().get("usage", {}).get("completion_tokens", 0)

    async def stream(self, path: str, body: dict[str, Any], drop_after: int | None = None) -> tuple[str, int]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        tokens, chunks = 0, 0
        async with self.client.stream("POST", path, json=body) as reply:
            if reply.status_code != 200:
                return f"HTTP {reply.status_code}", 0
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return f"stream error {chunk['error'].get('code')}", tokens
                chunks += 1
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if drop_after is not None and chunks >= drop_after:
                    return "ok", chunks  # the client goes away mid-stream
        return "ok", tokens

    def chat(self, system: str | None = None, **extra: Any) -> dict[str, Any]:
        messages = [{"role": "user", "content": self.words(self.rng.randint(5, 40))}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, **extra}

    async def shared(self) -> tuple[str, int]:
        body = self.chat(self.rng.choice(SYSTEMS))
        if self.rng.random() < 0.5:
            return await self.stream("/v1/chat/completions", body)
        return await self.post("/v1/chat/completions", body)

    async def random(self) -> tuple[str, int]:
        body = {
            "model": self.model,
            "prompt": self.words(self.rng.randint(20, 120)),
            "max_tokens": self.max_tokens,
        }
        return await self.post("/v1/completions", body)

    async def context(self) -> tuple[str, int]:
        made = await self.client.post(
            "/v1/contexts", json={"model": self.model, "prompt": self.rng.choice(SYSTEMS), "ttl_seconds": 300}
        )
        if made.status_code == 429:  # the pinned-token cap: a correct answer under load, not an error
            return "ok", 0
        if made.status_code != 200:
            return f"create HTTP {made.status_code}", 0
        context_id = made.json()["id"]
        try:
            return await self.post("/v1/chat/completions", self.chat(context_id=context_id))
        finally:
            deleted = await self.client.delete(f"/v1/contexts/{context_id}")
            if deleted.status_code != 200:
                return f"delete HTTP {deleted.status_code}", 0  # noqa: B012 - the outcome to record

    async def n2(self) -> tuple[str, int]:
        body = {"model": self.model, "prompt": self.words(30), "max_tokens": self.max_tokens, "n": 2,
                "stop": [" the", "."], "temperature": 0.8, "seed": self.rng.randint(0, 1 << 30)}  # fmt: skip
        return await self.post("/v1/completions", body)

    async def logprobs(self) -> tuple[str, int]:
        return await self.post("/v1/chat/completions", self.chat(logprobs=True, top_logprobs=2))

    async def disconnect(self) -> tuple[str, int]:
        body = self.chat(self.rng.choice(SYSTEMS), max_tokens=max(self.max_tokens, 32), ignore_eos=True)
        return await self.stream("/v1/chat/completions", body, drop_after=self.rng.randint(1, 4))

    async def malformed(self) -> tuple[str, int]:
        nested = "[" * 5000 + "]" * 5000
        user = {"role": "user", "content": "hi \\ud800"}  # a lone surrogate, escaped as JSON allows
        surrogate = json.dumps({"model": self.model, "messages": [user]}).replace("\\\\", "\\").encode()
        bad: list[tuple[str, bytes]] = [
            ("/v1/chat/completions", b'{"model": "x", "messages": ['),
            ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "hi"}).encode()),
            ("/v1/completions", json.dumps({"model": self.model, "prompt": "hi", "max_tokens": -3}).encode()),
            ("/v1/chat/completions", surrogate),
            ("/v1/completions", json.dumps({"model": self.model, "prompt": "x", "priority": 2**70}).encode()),
            ("/v1/completions", f'{{"model": "{self.model}", "prompt": {nested}}}'.encode()),
            ("/v1/completions", json.dumps({"model": self.model, "prompt": "x" * (12 << 20)}).encode()),
        ]  # fmt: skip
        path, content = self.rng.choice(bad)
        reply = await self.client.post(path, content=content, headers={"content-type": "application/json"})
        return ("ok" if 400 <= reply.status_code < 500 else f"HTTP {reply.status_code}"), 0


async def worker(traffic: Traffic, results: Results, t0: float, deadline: float, timeout: float) -> None:
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.monotonic() < deadline:
        kind = traffic.rng.choices(kinds, weights)[0]
        try:
            outcome, tokens = await asyncio.wait_for(getattr(traffic, kind)(), timeout)
        except TimeoutError:
            outcome, tokens = "timeout", 0
        except httpx.HTTPError as exc:
            outcome, tokens = type(exc).__name__, 0
        results.outcomes[kind][outcome] += 1
        minute = int((time.monotonic() - t0) // 60)
        results.requests_per_minute[minute] += 1
        results.tokens_per_minute[minute] += tokens


# ---- observation -------------------------------------------------------------------------------------
def role(process: psutil.Process) -> str:
    args = process.cmdline()
    text = " ".join(args)

    def flag(name: str) -> str:
        return args[args.index(name) + 1] if name in args else "?"

    if "deepflow.platform.cluster" in text:
        return "cm"
    if "deepflow.platform.je" in text:
        return f"je {flag('--je-id')}"
    if "deepflow.platform.te" in text:
        return f"te {flag('--te-id')}"
    if " serve" in text:
        return "launcher"
    return f"worker {process.pid}"  # tokenizer workers and the like


async def sample_rss(root: psutil.Process, results: Results, t0: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                # A restarted process is a new pid: keyed by pid, so its growth is measured on its own.
                results.rss[f"{role(process)} (pid {process.pid})"].append(
                    (time.monotonic() - t0, process.memory_info().rss)
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 10.0)


async def kv_usage(client: httpx.AsyncClient) -> float:
    """Sum of the TEs' KV usage (blocks held by requests or pinned), once every TE is idle (bounded wait)."""
    for _ in range(600):
        cluster = (await client.get("/v1/cluster")).json()
        tes = [te for te in cluster["tes"] if te["state"] != "removed"]
        ready = tes and all(te["state"] == "ready" for te in tes)  # every TE up (and none restarting)
        if ready and all(te["load"]["running"] == 0 and te["load"]["waiting"] == 0 for te in tes):
            return sum(te["kv_usage"] or 0.0 for te in tes)
        await asyncio.sleep(0.5)
    raise SystemExit("the TEs never became idle")


async def soak(url: str, model: str, root: psutil.Process | None, args: argparse.Namespace) -> Results:
    results = Results()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=url, timeout=args.timeout, limits=limits, headers=headers
    ) as client:
        results.kv_baseline = await kv_usage(client)
        t0 = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(root, results, t0, stop)) if root is not None else None
        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency)]
        await asyncio.gather(*(
            worker(Traffic(client, model, args.max_tokens, rng), results, t0, t0 + args.duration,
                   args.timeout)
            for rng in rngs
        ))  # fmt: skip
        results.duration_s = time.monotonic() - t0
        stop.set()
        if sampler is not None:
            await sampler
        results.kv_end = await kv_usage(client)
    return results


def report(results: Results) -> str:
    lines = ["| kind | requests | ok | errors |", "|---|---:|---:|---|"]
    for kind in KINDS:
        outcomes = results.outcomes.get(kind, Counter())
        bad = ", ".join(f"{o}: {n}" for o, n in outcomes.items() if o != "ok") or "0"
        lines.append(f"| {kind} | {sum(outcomes.values())} | {outcomes['ok']} | {bad} |")
    lines += ["", "| minute | requests | output tok/s |", "|---:|---:|---:|"]
    for minute in sorted(results.requests_per_minute):
        seconds = min(60.0, results.duration_s - 60 * minute)
        lines.append(
            f"| {minute} | {results.requests_per_minute[minute]} | "
            f"{results.tokens_per_minute[minute] / max(seconds, 1e-9):.1f} |"
        )
    lines += ["", "| process | RSS after warm-up (MiB) | RSS at end (MiB) | growth |", "|---|---:|---:|---:|"]
    for name, samples in sorted(results.rss.items()):
        growth = rss_growth(samples, results.duration_s)
        after = [rss for t, rss in samples if t >= WARMUP_FRACTION * results.duration_s] or [samples[-1][1]]
        shown = f"{growth:+.1%}" if growth is not None else "n/a"
        lines.append(f"| {name} | {after[0] / 2**20:.0f} | {after[-1] / 2**20:.0f} | {shown} |")
    lines += ["", f"KV usage: idle {results.kv_baseline}, after the soak {results.kv_end}"]
    reasons = verdict(results)
    lines.append("PASS" if not reasons else "FAIL: " + "; ".join(reasons))
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server (its process tree is not sampled unless --pid)")
    target.add_argument("--serve", default="--tes 2", help="arguments of the `deepflow serve` to start")
    p.add_argument("--pid", type=int, help="with --url: the launcher's pid, to sample RSS")
    p.add_argument("--port", type=int, default=8311)
    p.add_argument("--duration", type=parse_duration, default=1800.0, help="e.g. 30m (default), 300s")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--timeout", type=float, default=180.0, help="client timeout per request (s)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    async def run(url: str, root: psutil.Process | None) -> Results:
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as probe:
            headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            model = (await probe.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        return await soak(url, model, root, args)

    if args.url:
        results = asyncio.run(run(args.url, psutil.Process(args.pid) if args.pid else None))
    else:
        cmd = [str(DEEPFLOW), "serve", "--port", str(args.port), *shlex.split(args.serve)]
        with Server(cmd, args.port, args.out / "server.log", args.startup_timeout) as server:
            assert server.proc is not None
            results = asyncio.run(run(server.url, psutil.Process(server.proc.pid)))
    text = report(results)
    print(text)
    (args.out / "soak.json").write_text(json.dumps({
        "outcomes": results.outcomes, "requests_per_minute": results.requests_per_minute,
        "tokens_per_minute": results.tokens_per_minute, "rss": results.rss,
        "kv_baseline": results.kv_baseline,
        "kv_end": results.kv_end, "duration_s": results.duration_s, "verdict": verdict(results),
    }, indent=1))  # fmt: skip
    sys.exit(1 if verdict(results) else 0)


if __name__ == "__main__":
    main()
