"""A bounded soak of `deepflow serve` at saturation with mixed traffic: nothing lost, nothing leaked.

Reproduce (the recorded run):

    .venv/bin/python benchmarks/soak.py --serve "--tes 2" --duration 30m

Full form:

    python benchmarks/soak.py [--serve "ARGS" | --url http://127.0.0.1:PORT [--pid PID]] [--port 8311]
        [--duration 30m] [--concurrency 24] [--max-tokens 32] [--timeout 120] [--max-requests-per-worker N]
        [--shared-prefix-share 0.35] [--context-share 0.1] [--disconnect-share 0.1] [--malformed-share 0.1]
        [--chat-share 0.5] [--stream-share 0.5] [--n2-share 0.15] [--stop-share 0.3] [--logprobs-share 0.2]
        [--system-prompts 3] [--system-words 250] [--rss-interval 10] [--warmup-fraction 0.2]
        [--rss-limit 5] [--api-key KEY] [--seed 0] [--startup-timeout 600] [--out-dir DIR]

Target: `--serve ARGS` starts `deepflow serve --host 127.0.0.1 --port PORT ARGS` in its own process group
(the way the other benchmarks do, `host_tier.Server`) and stops it at the end (SIGTERM to the group, then
SIGKILL; any process of its tree still alive after that is killed by pid). `--url` soaks a running server
instead; its process tree is found from the process listening on the port (or `--pid`, the launcher's).
Traffic goes to 127.0.0.1 only.

Load: `concurrency` closed-loop workers; each draws the kind of its next request (seeded):
  shared      a chat/completion starting with one of `system-prompts` long system prompts (prefix cache)
  random      a chat/completion of random words
  context     POST /v1/contexts, one or two requests naming its `context_id`, DELETE, then GET must be 404
  disconnect  a stream the client drops after 1-4 chunks (the server must abort it and free its blocks)
  malformed   one of: bad JSON, not an object, unknown model, out-of-range values, a lone surrogate
              "\\ud800", a 2**70 priority, deeply nested JSON, a token id outside the vocabulary, an unknown
              context, a wrong type, a body over the size limit; each must be answered 4xx (a 5xx, a 200 or
              a dropped connection is an error)
`shared`, `context`, `disconnect` and `malformed` take their shares, `random` the rest. Generation requests
mix chat and completions, streaming and not, n=2, stop strings and logprobs by their shares; every answer is
checked (status, choice count, logprobs present, no stop string in the text, a stream ends with [DONE]).
Every request has a client timeout, every loop a bound in count and time; the load stops at `duration`, the
requests in flight finish (bounded by the timeout), the soak's contexts still alive are deleted.

Observed: the RSS of every process of the server's tree (launcher, CM, each JE, each TE, tokenizer workers)
every `rss-interval` s, and each TE's load; each TE's KV blocks in use and pinned context tokens from
GET /v1/cluster, idle before the load (the baseline) and idle after it.

Verdict: PASS when every request but the malformed ones succeeded and every malformed one got a 4xx (a 429
for a context over the pinned-token cap is a correct answer, shown apart), every TE's KV blocks in use and
pinned tokens are back to the baseline, no TE restarted and no process exited, and every process's RSS at
the end is less than `rss-limit`% above its RSS after warm-up (its first sample past `warmup-fraction` of
the load). Otherwise FAIL with the reasons; exit status 1.
Output: tables on stdout, OUT_DIR/soak.json (every sample), OUT_DIR/summary.md, OUT_DIR/server.log.
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
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_tier import DEEPFLOW, ROOT, Server  # same server handling as the other benchmarks

KINDS = ("shared", "random", "context", "disconnect", "malformed")
MALFORMED = (
    "bad_json",
    "not_an_object",
    "unknown_model",
    "max_tokens_negative",
    "temperature_out_of_range",
    "top_logprobs_out_of_range",
    "n_zero",
    "lone_surrogate_chat",
    "lone_surrogate_prompt",
    "priority_2_70",
    "nested_array",
    "nested_object",
    "token_out_of_vocab",
    "unknown_context",
    "wrong_type",
    "oversized_body",
)
STOPS = (".", "\n", " the", "!")
OK, OK_CAP = "ok", "ok: 429 context cap"  # outcomes that are not errors start with "ok"
MiB = 2**20


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- results and verdict (pure: tests/bench/test_soak_report.py) -------------------------------------
@dataclass
class KVReading:
    """One TE's KV state from /v1/cluster."""

    blocks_in_use: int
    num_blocks: int
    pinned_tokens: int
    restarts: int = 0


@dataclass
class Results:
    load_s: float = 0.0  # the load phase (workers stop starting requests after it)
    duration_s: float = 0.0  # until the last request in flight ended
    outcomes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    malformed: dict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )  # variant: status
    requests_per_minute: Counter[int] = field(default_factory=Counter)
    tokens_per_minute: Counter[int] = field(default_factory=Counter)
    errors_per_minute: Counter[int] = field(default_factory=Counter)
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))  # name: (t, B)
    rss_rounds: list[float] = field(default_factory=list)  # when each sampling round ran
    te_load: dict[str, list[tuple[float, int, int]]] = field(default_factory=lambda: defaultdict(list))
    kv_baseline: dict[str, KVReading] | None = None  # te_id: reading
    kv_end: dict[str, KVReading] | None = None
    contexts_left: int = 0  # contexts the soak still had to delete at the end
    notes: list[str] = field(default_factory=list)

    def record(self, kind: str, outcome: str, t: float, tokens: int = 0) -> None:
        self.outcomes[kind][outcome] += 1
        minute = max(int(t // 60), 0)
        self.requests_per_minute[minute] += 1
        self.tokens_per_minute[minute] += tokens
        if not outcome.startswith(OK):
            self.errors_per_minute[minute] += 1


def errors(results: Results) -> dict[str, int]:
    """Every outcome that is an error, as "kind: outcome" -> count (outcomes starting with "ok" are not)."""
    return {
        f"{kind}: {outcome}": count
        for kind, outcomes in results.outcomes.items()
        for outcome, count in sorted(outcomes.items())
        if not outcome.startswith(OK)
    }


def rss_growth(samples: list[tuple[float, int]], load_s: float, warmup_fraction: float = 0.2) -> float | None:
    """RSS at the last sample over RSS at the first sample past warm-up, minus one; None without two."""
    after = [rss for t, rss in samples if t >= warmup_fraction * load_s]
    if len(after) < 2 or after[0] <= 0:
        return None
    return after[-1] / after[0] - 1.0


def process_problems(results: Results) -> list[str]:
    """Processes that exited during the run, and platform processes (not workers) that started during it."""
    if not results.rss_rounds:
        return []
    first, last = results.rss_rounds[0], results.rss_rounds[-1]
    out = []
    for name, samples in sorted(results.rss.items()):
        if samples[-1][0] < last:
            out.append(f"{name} exited during the run (last seen at {samples[-1][0]:.0f} s)")
        elif samples[0][0] > first and not name.startswith("worker"):
            out.append(f"{name} started during the run (at {samples[0][0]:.0f} s): a restart")
    return out


def kv_problems(results: Results) -> list[str]:
    if not results.kv_baseline or results.kv_end is None:
        return ["KV usage unknown (no /v1/cluster reading)"]
    out = []
    for te, base in sorted(results.kv_baseline.items()):
        end = results.kv_end.get(te)
        if end is None:
            out.append(f"{te}: no KV reading at the end")
            continue
        if end.blocks_in_use > base.blocks_in_use:
            out.append(f"{te}: {end.blocks_in_use} KV blocks in use at the end vs {base.blocks_in_use} idle")
        if end.pinned_tokens > base.pinned_tokens:
            out.append(f"{te}: {end.pinned_tokens} pinned context tokens at the end vs {base.pinned_tokens}")
        if end.restarts > base.restarts:
            out.append(f"{te}: restarted {end.restarts - base.restarts} time(s) during the run")
    return out


def verdict(results: Results, rss_limit: float = 0.05, warmup_fraction: float = 0.2) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = [f"{count} x {what}" for what, count in errors(results).items()]
    if not any(n for kind, c in results.outcomes.items() if kind != "malformed" for n in c.values()):
        reasons.append("no request was served")
    reasons += kv_problems(results)
    if not results.rss:
        reasons.append("RSS not sampled (no process tree)")
    for name, samples in sorted(results.rss.items()):
        growth = rss_growth(samples, results.load_s, warmup_fraction)
        if growth is not None and growth >= rss_limit:
            reasons.append(f"{name} RSS grew {growth:+.1%} after warm-up (limit {rss_limit:.0%})")
    reasons += process_problems(results)
    if results.contexts_left:
        reasons.append(f"{results.contexts_left} context(s) the soak made were not deleted in the run")
    return reasons


def _mib(x: int) -> str:
    return f"{x / MiB:,.0f}"


def report(results: Results, rss_limit: float = 0.05, warmup_fraction: float = 0.2) -> str:
    """The stdout tables; the last line is PASS or FAIL: reasons."""
    lines = [
        f"load {results.load_s:.0f} s, drained at {results.duration_s:.0f} s",
        "",
        "| kind | requests | ok | errors | error kinds |",
        "|---|---:|---:|---:|---|",
    ]
    kinds = [*KINDS, *sorted(set(results.outcomes) - set(KINDS))]
    for kind in kinds:
        c = results.outcomes.get(kind, Counter())
        ok = sum(n for o, n in c.items() if o.startswith(OK))
        bad = {o: n for o, n in sorted(c.items()) if not o.startswith(OK)}
        extra = f" ({c[OK_CAP]} x 429 cap)" if c.get(OK_CAP) else ""
        lines.append(
            f"| {kind} | {sum(c.values())} | {ok}{extra} | {sum(bad.values())} "
            f"| {', '.join(f'{o}: {n}' for o, n in bad.items()) or '-'} |"
        )
    lines += [
        "",
        "| malformed variant | sent | 4xx as expected | not (status: count) |",
        "|---|---:|---:|---|",
    ]
    for variant in sorted(results.malformed):
        c = results.malformed[variant]
        good = sum(n for s, n in c.items() if s.isdigit() and 400 <= int(s) < 500)
        bad = ", ".join(
            f"{s}: {n}" for s, n in sorted(c.items()) if not (s.isdigit() and 400 <= int(s) < 500)
        )
        answered = "/".join(sorted(s for s in c if s.isdigit() and 400 <= int(s) < 500))
        lines.append(f"| {variant} | {sum(c.values())} | {good} ({answered or '-'}) | {bad or '-'} |")
    lines += [
        "",
        "| minute | window (s) | requests | req/s | output tok/s | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    windows: list[tuple[str, list[int], float]] = []  # label, minutes, seconds
    minutes = sorted(results.requests_per_minute)
    for minute in minutes:
        seconds = max(min(60.0, results.duration_s - 60 * minute), 0.0)
        if windows and minute == minutes[-1] and seconds < 10.0:  # a few seconds of drain: fold it in
            label, merged, total = windows[-1]
            windows[-1] = (f"{label}-{minute}", [*merged, minute], total + seconds)
        else:
            windows.append((str(minute), [minute], max(seconds, 1.0)))
    for label, merged, seconds in windows:
        requests = sum(results.requests_per_minute[m] for m in merged)
        tokens = sum(results.tokens_per_minute[m] for m in merged)
        lines.append(
            f"| {label} | {seconds:.0f} | {requests} | {requests / seconds:.2f} | {tokens / seconds:.1f} "
            f"| {sum(results.errors_per_minute[m] for m in merged)} |"
        )
    total_s = max(results.duration_s, 1e-9)
    lines.append(
        f"| all | {results.duration_s:.0f} | {sum(results.requests_per_minute.values())} "
        f"| {sum(results.requests_per_minute.values()) / total_s:.2f} "
        f"| {sum(results.tokens_per_minute.values()) / total_s:.1f} "
        f"| {sum(results.errors_per_minute.values())} |"
    )
    if results.te_load:
        lines += ["", "| TE | mean running | mean waiting | samples |", "|---|---:|---:|---:|"]
        for te, samples in sorted(results.te_load.items()):
            under_load = [s for s in samples if s[0] <= results.load_s] or samples
            running = sum(s[1] for s in under_load) / len(under_load)
            waiting = sum(s[2] for s in under_load) / len(under_load)
            lines.append(f"| {te} | {running:.1f} | {waiting:.1f} | {len(under_load)} |")
    lines += [
        "",
        "| process | RSS start (MiB) | after warm-up | peak | end "
        f"| growth after warm-up (limit {rss_limit:.0%}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, samples in sorted(results.rss.items()):
        growth = rss_growth(samples, results.load_s, warmup_fraction)
        after = [rss for t, rss in samples if t >= warmup_fraction * results.load_s] or [samples[-1][1]]
        values = [rss for _, rss in samples]
        lines.append(
            f"| {name} | {_mib(values[0])} | {_mib(after[0])} | {_mib(max(values))} | {_mib(values[-1])} "
            f"| {'n/a' if growth is None else f'{growth:+.2%}'} |"
        )
    lines += ["", "| TE | KV blocks in use: idle / end (of) | pinned context tokens: idle / end | restarts |"]
    lines.append("|---|---:|---:|---:|")
    for te in sorted(set(results.kv_baseline or {}) | set(results.kv_end or {})):
        b, e = (results.kv_baseline or {}).get(te), (results.kv_end or {}).get(te)
        lines.append(
            f"| {te} | {b.blocks_in_use if b else '?'} / {e.blocks_in_use if e else '?'} "
            f"({(e or b).num_blocks if (e or b) else '?'}) "
            f"| {b.pinned_tokens if b else '?'} / {e.pinned_tokens if e else '?'} "
            f"| {e.restarts - b.restarts if b and e else '?'} |"
        )
    lines += ["", *results.notes]
    reasons = verdict(results, rss_limit, warmup_fraction)
    lines.append("PASS" if not reasons else "FAIL: " + "; ".join(reasons))
    return "\n".join(lines)


def to_json(results: Results) -> dict[str, Any]:
    def kv(readings: dict[str, KVReading] | None) -> dict[str, Any] | None:
        return None if readings is None else {te: vars(r) for te, r in readings.items()}

    return {
        "load_s": results.load_s,
        "duration_s": results.duration_s,
        "outcomes": results.outcomes,
        "malformed": results.malformed,
        "requests_per_minute": results.requests_per_minute,
        "tokens_per_minute": results.tokens_per_minute,
        "errors_per_minute": results.errors_per_minute,
        "rss_bytes": results.rss,
        "rss_rounds_s": results.rss_rounds,
        "te_load": results.te_load,
        "kv_baseline": kv(results.kv_baseline),
        "kv_end": kv(results.kv_end),
        "contexts_left": results.contexts_left,
        "notes": results.notes,
    }


# ---- traffic -----------------------------------------------------------------------------------------------
class BadResponse(Exception):
    """A 200 whose body is not what was asked for."""


@dataclass
class Shares:
    shared_prefix: float = 0.35
    context: float = 0.1
    disconnect: float = 0.1
    malformed: float = 0.1
    chat: float = 0.5
    stream: float = 0.5
    n2: float = 0.15
    stop: float = 0.3
    logprobs: float = 0.2

    def kind(self, rng: random.Random) -> str:
        x = rng.random()
        for kind, share in (
            ("shared", self.shared_prefix),
            ("context", self.context),
            ("disconnect", self.disconnect),
            ("malformed", self.malformed),
        ):
            if x < share:
                return kind
            x -= share
        return "random"


class Traffic:
    """One worker's requests; each method returns (outcome, output tokens) or raises (recorded by class)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        model: str,
        args: argparse.Namespace,
        systems: list[str],
        rng: random.Random,
        contexts: set[str],
    ) -> None:
        self.client, self.model, self.args, self.systems, self.rng = client, model, args, systems, rng
        self.shares: Shares = args.shares
        self.contexts = contexts  # ids the soak made and has not deleted yet (shared by all workers)

    def words(self, n: int) -> str:
        return " ".join(
            "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(2, 7))) for _ in range(n)
        )

    def sampling(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.rng.randint(max(1, self.args.max_tokens // 2), self.args.max_tokens),
            "temperature": 0.8,
            "seed": self.rng.randint(0, 2**31),
        }
        if self.rng.random() < self.shares.n2:
            body["n"] = 2
        if self.rng.random() < self.shares.stop:
            body["stop"] = self.rng.sample(STOPS, 2)
        return body

    async def generate(
        self, system: str | None, extra: dict[str, Any] | None = None, chat: bool | None = None
    ) -> tuple[str, int]:
        """A chat or completion (the shares decide unless `chat`) after `system`, streamed or not, checked."""
        body = {**self.sampling(), **(extra or {})}
        user = self.words(self.rng.randint(10, 60))
        if chat is None:
            chat = self.rng.random() < self.shares.chat
        logprobs = self.rng.random() < self.shares.logprobs
        if chat:
            messages = [{"role": "user", "content": user}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            body["messages"] = messages
            if logprobs:
                body.update(logprobs=True, top_logprobs=2)
            path = "/v1/chat/completions"
        else:
            body["prompt"] = user if system is None else f"{system}\n\n{user}"
            if logprobs:
                body["logprobs"] = 2
            path = "/v1/completions"
        if self.rng.random() < self.shares.stream:
            return await self.stream(path, body, logprobs)
        return await self.post(path, body, logprobs)

    def check(
        self, texts: dict[int, str], logprobs: dict[int, bool], body: dict[str, Any], want_lp: bool
    ) -> None:
        n = body.get("n", 1)
        if sorted(texts) != list(range(n)):
            raise BadResponse(f"choices {sorted(texts)} for n={n}")
        for index, text in texts.items():
            for stop in body.get("stop") or ():
                if stop in text:
                    raise BadResponse(f"stop string {stop!r} in choice {index}")
            if want_lp and not logprobs.get(index) and text:
                raise BadResponse(f"no logprobs in choice {index}")

    async def post(self, path: str, body: dict[str, Any], want_lp: bool) -> tuple[str, int]:
        reply = await self.client.post(path, json=body)
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}", 0
        data = reply.json()
        texts, lps = {}, {}
        for choice in data.get("choices") or ():
            i = choice["index"]
            texts[i] = (choice["message"]["content"] or "") if "message" in choice else choice["text"]
            lps[i] = bool(choice.get("logprobs"))
        self.check(texts, lps, body, want_lp)
        return OK, int(data["usage"]["completion_tokens"])

    async def stream(
        self, path: str, body: dict[str, Any], want_lp: bool, drop_after: int | None = None
    ) -> tuple[str, int]:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        texts: dict[int, str] = defaultdict(str)
        lps: dict[int, bool] = defaultdict(bool)
        tokens = chunks = 0
        done = False
        async with self.client.stream("POST", path, json=body) as reply:
            if reply.status_code != 200:
                return f"HTTP {reply.status_code}", 0
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    return f"stream error {error.get('code') or error.get('type')}", tokens
                for choice in chunk.get("choices") or ():
                    i = choice["index"]
                    delta = choice.get("delta")
                    texts[i] += (
                        (delta.get("content") or "") if delta is not None else choice.get("text") or ""
                    )
                    lps[i] = lps[i] or bool(choice.get("logprobs"))
                    chunks += 1
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                if drop_after is not None and chunks >= drop_after:
                    return OK, chunks  # leaving the block closes the connection mid-stream
        if drop_after is not None:
            return OK, chunks  # ended before the drop point: short answers are fine
        if not done:
            raise BadResponse("stream ended without data: [DONE]")
        self.check(dict(texts), dict(lps), body, want_lp)
        return OK, tokens

    # ---- the kinds
    async def shared(self) -> tuple[str, int]:
        return await self.generate(self.rng.choice(self.systems))

    async def random(self) -> tuple[str, int]:
        return await self.generate(None)

    async def context(self) -> tuple[str, int]:
        from_messages = self.rng.random() < 0.5
        text = self.words(self.rng.randint(60, 200))
        made = {"model": self.model, "ttl_seconds": 600}
        if from_messages:
            made["messages"] = [{"role": "system", "content": text}]
        else:
            made["prompt"] = text
        reply = await self.client.post("/v1/contexts", json=made)
        if reply.status_code == 429:  # over the pinned-token cap: the documented answer under load
            return OK_CAP, 0
        if reply.status_code != 200:
            return f"create HTTP {reply.status_code}", 0
        context_id = reply.json()["id"]
        self.contexts.add(context_id)
        tokens = 0
        for _ in range(self.rng.randint(1, 2)):
            # A messages context goes in front of chat messages; a prompt one in front of either.
            outcome, n = await self.generate(
                None, {"context_id": context_id}, True if from_messages else None
            )
            tokens += n
            if outcome != OK:
                return f"use {outcome}", tokens
        deleted = await self.client.delete(f"/v1/contexts/{context_id}")
        if deleted.status_code != 200:
            return f"delete HTTP {deleted.status_code}", tokens
        self.contexts.discard(context_id)
        gone = await self.client.get(f"/v1/contexts/{context_id}")
        if gone.status_code != 404:
            return f"GET after delete HTTP {gone.status_code}", tokens
        return OK, tokens

    async def disconnect(self) -> tuple[str, int]:
        body = {**self.sampling(), "max_tokens": max(self.args.max_tokens, 32), "ignore_eos": True}
        body.pop("stop", None)
        if self.rng.random() < self.shares.chat:
            body["messages"] = [
                {"role": "system", "content": self.rng.choice(self.systems)},
                {"role": "user", "content": self.words(20)},
            ]
            path = "/v1/chat/completions"
        else:
            body["prompt"], path = self.words(self.rng.randint(20, 80)), "/v1/completions"
        return await self.stream(path, body, False, drop_after=self.rng.randint(1, 4))

    def malformed_body(self, variant: str) -> tuple[str, bytes]:
        m, chat, comp = self.model, "/v1/chat/completions", "/v1/completions"
        user = [{"role": "user", "content": "hi"}]

        def js(path: str, body: Any) -> tuple[str, bytes]:
            return path, json.dumps(body).encode()

        if variant == "bad_json":
            return chat, b'{"model": "x", "messages": ['
        if variant == "not_an_object":
            return comp, b"[1, 2, 3]"
        if variant == "unknown_model":
            return js(comp, {"model": "no-such-model", "prompt": "hi", "max_tokens": 4})
        if variant == "max_tokens_negative":
            return js(comp, {"model": m, "prompt": "hi", "max_tokens": -3})
        if variant == "temperature_out_of_range":
            return js(chat, {"model": m, "messages": user, "temperature": 1e9, "max_tokens": 4})
        if variant == "top_logprobs_out_of_range":
            return js(chat, {"model": m, "messages": user, "logprobs": True, "top_logprobs": 10**6})
        if variant == "n_zero":
            return js(comp, {"model": m, "prompt": "hi", "n": 0})
        if variant == "lone_surrogate_chat":  # json.dumps escapes it as \ud800, which JSON allows
            return js(
                chat, {"model": m, "messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 4}
            )
        if variant == "lone_surrogate_prompt":
            return js(comp, {"model": m, "prompt": "hi \ud800 there", "max_tokens": 4})
        if variant == "priority_2_70":
            return js(comp, {"model": m, "prompt": "hi", "max_tokens": 4, "priority": 2**70})
        if variant == "nested_array":
            return comp, f'{{"model": "{m}", "prompt": {"[" * 10000}{"]" * 10000}}}'.encode()
        if variant == "nested_object":
            deep = '{"a": ' * 5000 + "1" + "}" * 5000
            head = json.dumps({"model": m, "messages": user})[:-1]
            return chat, f'{head}, "metadata": {deep}}}'.encode()
        if variant == "token_out_of_vocab":
            return js(comp, {"model": m, "prompt": [1, 2, 10**9], "max_tokens": 4})
        if variant == "unknown_context":
            return js(
                chat, {"model": m, "messages": user, "context_id": "ctx-soak-never-made", "max_tokens": 4}
            )
        if variant == "wrong_type":
            return js(chat, {"model": m, "messages": "hello", "max_tokens": "many"})
        if variant == "oversized_body":
            return js(comp, {"model": m, "prompt": "x" * (8 * MiB), "max_tokens": 4})
        raise ValueError(variant)

    async def malformed(self, results: Results) -> tuple[str, int]:
        variant = self.rng.choice(MALFORMED)
        path, content = self.malformed_body(variant)
        try:
            reply = await self.client.post(
                path, content=content, headers={"content-type": "application/json"}
            )
        except Exception as exc:  # a dropped connection is an error too, recorded per variant
            results.malformed[variant][type(exc).__name__] += 1
            raise
        results.malformed[variant][str(reply.status_code)] += 1
        if 400 <= reply.status_code < 500:
            return OK, 0
        return f"{variant} HTTP {reply.status_code}", 0


async def worker(traffic: Traffic, results: Results, t0: float, args: argparse.Namespace) -> None:
    deadline = t0 + args.duration
    for _ in range(args.max_requests_per_worker):  # bounded in count ...
        if time.monotonic() >= deadline:  # ... and in time
            return
        kind = traffic.shares.kind(traffic.rng)
        tokens = 0
        try:
            async with asyncio.timeout(args.timeout):
                if kind == "malformed":
                    outcome, tokens = await traffic.malformed(results)
                else:
                    outcome, tokens = await getattr(traffic, kind)()
        except TimeoutError:
            outcome = "timeout"
        except BadResponse as exc:
            outcome = f"bad response: {exc}"
        except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError included
            outcome = f"bad body: {type(exc).__name__}"
        except Exception as exc:  # httpx errors by class; never lose a worker
            outcome = type(exc).__name__
        results.record(kind, outcome, time.monotonic() - t0, tokens)


# ---- observation -------------------------------------------------------------------------------------
def role(process: psutil.Process, tree: dict[int, str]) -> str:
    """launcher, cm, je-0, te-1, worker of je-0 (tokenizer pool, resource tracker), or other."""
    args = process.cmdline()
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else ""

    def flag(name: str) -> str:
        return args[args.index(name) + 1] if name in args[:-1] else "?"

    if module == "deepflow.platform.cluster":
        return "cm"
    if module == "deepflow.platform.je":
        return flag("--je-id") if flag("--je-id") != "?" else "je"
    if module == "deepflow.platform.te":
        return flag("--te-id")
    if "serve" in args and (module == "deepflow.cli" or any(a.endswith("deepflow") for a in args[:2])):
        return "launcher"
    parent = tree.get(process.ppid(), "?")
    what = "resource tracker" if "resource_tracker" in " ".join(args) else "tokenizer/worker"
    return f"worker ({what} of {parent})"


def sample_rss(root: psutil.Process, results: Results, t: float) -> list[psutil.Process]:
    """One round over the server's tree; a restarted process has a new pid, so a new row."""
    tree: dict[int, str] = {}
    seen = []
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return seen
    for process in processes:
        with contextlib.suppress(psutil.Error):
            name = role(process, tree)
            tree[process.pid] = name
            results.rss[f"{name} (pid {process.pid})"].append((t, process.memory_info().rss))
            seen.append(process)
    results.rss_rounds.append(t)
    return seen


async def cluster(client: httpx.AsyncClient) -> dict[str, Any]:
    reply = await client.get("/v1/cluster", timeout=30.0)
    reply.raise_for_status()
    return reply.json()


def kv_readings(report: dict[str, Any]) -> dict[str, KVReading]:
    out = {}
    for te in report["tes"]:
        if te["state"] == "removed":
            continue
        blocks = te.get("num_kv_blocks") or 0
        out[te["te_id"]] = KVReading(
            blocks_in_use=round((te.get("kv_usage") or 0.0) * blocks),
            num_blocks=blocks,
            pinned_tokens=te.get("pinned_context_tokens") or 0,
            restarts=te.get("restarts") or 0,
        )
    return out


async def idle_kv(client: httpx.AsyncClient, limit_s: float = 180.0) -> dict[str, KVReading] | None:
    """Each TE's KV once every TE is ready and idle and three readings 1 s apart agree (bounded wait)."""
    agreeing: list[dict[str, KVReading]] = []
    deadline = time.monotonic() + limit_s
    for _ in range(int(limit_s) + 1):
        if time.monotonic() > deadline:
            break
        try:
            report = await cluster(client)
        except (httpx.HTTPError, ValueError):
            agreeing = []
            await asyncio.sleep(1.0)
            continue
        tes = [te for te in report["tes"] if te["state"] != "removed"]
        idle = bool(tes) and all(
            te["state"] == "ready" and te["load"]["running"] == 0 and te["load"]["waiting"] == 0 for te in tes
        )
        reading = kv_readings(report)
        agreeing = [*agreeing, reading] if idle and (not agreeing or agreeing[-1] == reading) else []
        if not idle:
            agreeing = []
        if len(agreeing) >= 3:
            return reading
        await asyncio.sleep(1.0)
    return None


async def observe(
    client: httpx.AsyncClient, root: psutil.Process | None, results: Results, t0: float,
    stop: asyncio.Event, args: argparse.Namespace,
) -> None:  # fmt: skip
    rounds = int((args.duration + args.timeout) / args.rss_interval) + 10
    for _ in range(rounds):  # bounded; stop ends it first
        t = time.monotonic() - t0
        if root is not None:
            sample_rss(root, results, t)
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            for te in (await cluster(client))["tes"]:
                results.te_load[te["te_id"]].append((t, te["load"]["running"], te["load"]["waiting"]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.rss_interval)
        if stop.is_set():
            return


def system_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ["answer", "briefly", "politely", "the", "user", "question", "with", "care", "and", "facts"]
    return [
        f"You are assistant number {i}. " + " ".join(rng.choice(vocab) for _ in range(words))
        for i in range(count)
    ]


async def soak(url: str, root: psutil.Process | None, args: argparse.Namespace) -> Results:
    results = Results()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as client:
        models = (await client.get("/v1/models")).json()["data"]
        model = models[0]["id"]
        log(f"model {model}; waiting for idle TEs for the KV baseline")
        results.kv_baseline = await idle_kv(client)
        if results.kv_baseline is None:
            results.notes.append("the TEs never became idle before the load: no baseline")
        systems = system_prompts(args.system_prompts, args.system_words, args.seed)
        contexts: set[str] = set()
        t0 = time.monotonic()
        stop = asyncio.Event()
        observer = asyncio.create_task(observe(client, root, results, t0, stop, args))
        log(f"load: {args.concurrency} workers for {args.duration:g} s")
        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency)]
        await asyncio.gather(
            *(worker(Traffic(client, model, args, systems, rng, contexts), results, t0, args) for rng in rngs)
        )
        results.duration_s = time.monotonic() - t0
        results.load_s = min(args.duration, results.duration_s)
        stop.set()
        await observer
        if root is not None:
            sample_rss(root, results, results.duration_s)  # the end reading
        results.contexts_left = len(contexts)
        for context_id in sorted(contexts):  # made but not deleted in the run (a timeout or an error)
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"/v1/contexts/{context_id}", timeout=30.0)
        log(f"drained after {results.duration_s:.0f} s; waiting for idle TEs for the final KV reading")
        results.kv_end = await idle_kv(client)
    return results


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share is in [0, 1]: {text!r}")
    return value


def find_launcher(port: int) -> psutil.Process | None:
    """The server's root: a process listening on `port` (a JE: they inherit the launcher's socket), then up
    its parents while they are deepflow processes."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.status == "LISTEN" and conn.laddr.port == port and conn.pid:
                process = psutil.Process(conn.pid)
                for _ in range(8):  # bounded: launcher -> JE is one step
                    parent = process.parent()
                    if parent is None or parent.pid == 1 or "deepflow" not in " ".join(parent.cmdline()):
                        break
                    process = parent
                return process
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--serve", default="--tes 2", help='arguments of the `deepflow serve` to start ("--tes 2")'
    )
    target.add_argument("--url", help="soak a running server instead (127.0.0.1 only)")
    p.add_argument("--pid", type=int, help="with --url: the launcher's pid (default: found from the port)")
    p.add_argument("--port", type=int, default=8311, help="with --serve")
    p.add_argument("--duration", type=parse_duration, default=1800.0, help="30m (default), 300s, 1h")
    p.add_argument("--concurrency", type=int, default=24, help="closed-loop workers")
    p.add_argument("--max-tokens", type=int, default=32, help="per request, drawn in [max/2, max]")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    p.add_argument("--max-requests-per-worker", type=int, default=100_000)
    p.add_argument(
        "--shared-prefix-share", type=share, default=0.35, help="requests after a long system prompt"
    )
    p.add_argument("--context-share", type=share, default=0.1, help="context create/use/delete rounds")
    p.add_argument("--disconnect-share", type=share, default=0.1, help="streams dropped mid-way")
    p.add_argument("--malformed-share", type=share, default=0.1, help="malformed requests (must get 4xx)")
    p.add_argument("--chat-share", type=share, default=0.5, help="chat (else completions)")
    p.add_argument("--stream-share", type=share, default=0.5, help="streaming (else one JSON answer)")
    p.add_argument("--n2-share", type=share, default=0.15, help="n=2")
    p.add_argument("--stop-share", type=share, default=0.3, help="with stop strings")
    p.add_argument("--logprobs-share", type=share, default=0.2, help="with logprobs (top 2)")
    p.add_argument("--system-prompts", type=int, default=3, help="distinct shared system prompts")
    p.add_argument("--system-words", type=int, default=250, help="words per system prompt")
    p.add_argument("--rss-interval", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--warmup-fraction", type=share, default=0.2, help="of the load, before RSS growth counts")
    p.add_argument("--rss-limit", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/soak-DATE")
    args = p.parse_args()
    args.shares = Shares(
        shared_prefix=args.shared_prefix_share, context=args.context_share, disconnect=args.disconnect_share,
        malformed=args.malformed_share, chat=args.chat_share, stream=args.stream_share, n2=args.n2_share,
        stop=args.stop_share, logprobs=args.logprobs_share,
    )  # fmt: skip
    if args.shared_prefix_share + args.context_share + args.disconnect_share + args.malformed_share > 1.0:
        p.error("--shared-prefix-share + --context-share + --disconnect-share + --malformed-share exceed 1")
    if args.concurrency < 1 or args.max_tokens < 1 or not args.timeout > 0 or not args.rss_interval > 0:
        p.error("--concurrency, --max-tokens, --timeout and --rss-interval must be positive")
    if args.url and urlparse(args.url).hostname != "127.0.0.1":
        p.error("--url: traffic goes to 127.0.0.1 only")
    out = args.out_dir or ROOT / "benchmarks" / "results" / f"soak-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    rss_limit = args.rss_limit / 100

    seen: dict[int, psutil.Process] = {}
    if args.url:
        root = psutil.Process(args.pid) if args.pid else find_launcher(urlparse(args.url).port or 80)
        command = f"--url {args.url}"
        results = asyncio.run(soak(args.url.rstrip("/"), root, args))
        if root is None:
            results.notes.append("no process tree found for --url (pass --pid): RSS not sampled")
    else:
        cmd = [
            str(DEEPFLOW),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
            *shlex.split(args.serve),
        ]
        command = " ".join(cmd)
        with Server(cmd, args.port, out / "server.log", args.startup_timeout) as server:
            assert server.proc is not None
            root = psutil.Process(server.proc.pid)
            with contextlib.suppress(psutil.Error):
                seen = {p.pid: p for p in [root, *root.children(recursive=True)]}
            results = asyncio.run(soak(server.url, root, args))
            with contextlib.suppress(psutil.Error):
                seen.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        for process in seen.values():  # stop everything it started: whatever outlived the group's SIGKILL
            with contextlib.suppress(psutil.Error):
                if process.is_running():
                    results.notes.append(f"pid {process.pid} outlived the server's stop: killed")
                    process.kill()
    text = (
        f"soak of `{command}`: {args.concurrency} workers, max_tokens {args.max_tokens}, "
        f"timeout {args.timeout:g} s, seed {args.seed}\n\n" + report(results, rss_limit, args.warmup_fraction)
    )
    print(text)
    reasons = verdict(results, rss_limit, args.warmup_fraction)
    (out / "summary.md").write_text(text + "\n")
    settings = {k: (vars(v) if isinstance(v, Shares) else v) for k, v in vars(args).items()}
    settings["api_key"] = "***" if args.api_key else None
    data = {"command": command, "args": {k: str(v) for k, v in settings.items()}, **to_json(results)}
    (out / "soak.json").write_text(json.dumps({**data, "verdict": "PASS" if not reasons else "FAIL",
                                               "reasons": reasons}, indent=1))  # fmt: skip
    log(f"results in {out}")
    sys.exit(1 if reasons else 0)


if __name__ == "__main__":
    main()
