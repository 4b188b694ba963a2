"""Simulated workloads: the bench datasets' generators (random, shared-prefix, multi-turn) with Poisson
arrivals at a rate for a duration, or the replay of a JSON trace.

A workload is a time-ordered stream of `SimSession`s (made lazily: an hour of traffic is never held in
memory at once). A session's turns are sent one after another, each when the previous one ends (plus
`think_time_s`), as `deepflow bench serve` sends a conversation. Prompts are token ids of a synthetic word
pool (one token per word, as the bench's pool is); multi-turn prompts are the chat history — system prompt,
each earlier user message and the answer the simulated TE really produced, in ChatML framing (a few fixed
tokens per message) — so a turn hits the cache where its conversation's earlier turns ran.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepflow.bench.datasets import STREAM_ARRIVALS, random_dataset, rng_for
from deepflow.bench.tokens import WordPool

__all__ = [
    "WORKLOADS",
    "SimSession",
    "SimTurn",
    "TraceWorkload",
    "Workload",
    "WorkloadSpec",
    "chat_prompt",
    "synthetic_pool",
]

WORKLOADS = ("random", "shared-prefix", "multi-turn")

# ChatML framing (SmolLM2's template): <|im_start|>role\n ... <|im_end|>\n
IM_START, IM_END, NEWLINE = 1, 2, 198
ROLE_IDS = {"system": 9690, "user": 4093, "assistant": 520}


def synthetic_pool(size: int = 384, first_id: int = 1000) -> WordPool:
    """A word pool of `size` one-token words with ids `first_id`... (the bench keeps ~390 real words)."""
    ids = tuple(range(first_id, first_id + size))
    return WordPool(ids=ids, texts=tuple(f" w{i}" for i in ids))


def _message(role: str, content: list[int]) -> list[int]:
    return [IM_START, ROLE_IDS[role], NEWLINE, *content, IM_END, NEWLINE]


def chat_prompt(
    system: list[int] | None, history: list[tuple[list[int], list[int]]], user: list[int]
) -> list[int]:
    """The chat-templated prompt of a turn: system, earlier (user, answer) pairs, this user message, and the
    assistant header the model continues from."""
    ids: list[int] = _message("system", system) if system else []
    for asked, answered in history:
        ids += _message("user", asked)
        ids += _message("assistant", answered)
    ids += _message("user", user)
    ids += [IM_START, ROLE_IDS["assistant"], NEWLINE]
    return ids


@dataclass
class SimTurn:
    """One request's own input and output: `prompt` (token ids; multi-turn: the user message only)."""

    prompt: list[int]
    output_len: int  # tokens the answer has (EOS after them when below max_tokens)
    max_tokens: int | None = None  # None: output_len


@dataclass
class SimSession:
    index: int
    start_s: float
    turns: list[SimTurn]
    chat: bool = False  # multi-turn: each turn's prompt is the chat history
    system: list[int] | None = None
    cache_salt: str = ""
    think_time_s: float = 0.0


@dataclass
class WorkloadSpec:
    """A synthetic workload: `kind` sessions started by Poisson arrivals at `rate`/s for `duration_s`."""

    kind: str = "multi-turn"
    rate: float = 1.0  # sessions (multi-turn: conversations) per second
    duration_s: float = 60.0
    input_len: int = 256  # tokens per prompt (shared-prefix: the suffix; multi-turn: each user message)
    output_len: int = 128
    prefix_len: int = 1024  # shared-prefix: the shared prefix; multi-turn: each system prompt
    num_prefixes: int = 1  # distinct shared prefixes / system prompts (sessions pick one at random)
    # Popularity of the prefixes: 0 picks them uniformly; s > 0 picks the k-th (from 0) with probability
    # proportional to 1 / (k + 1)^s (Zipf), so a few prefixes draw most of the traffic (hot spots).
    prefix_zipf: float = 0.0
    num_turns: int = 4
    think_time_s: float = 0.0
    seed: int = 0
    max_sessions: int | None = None  # stop after this many sessions even before duration_s

    def validate(self) -> None:
        if self.kind not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {self.kind!r}")
        if self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("rate and duration must be > 0")
        if min(self.input_len, self.output_len, self.num_turns, self.num_prefixes) < 1 or self.prefix_len < 0:
            raise ValueError("input_len, output_len, num_turns, num_prefixes must be >= 1, prefix_len >= 0")
        if self.prefix_zipf < 0:
            raise ValueError("prefix_zipf must be >= 0")

    @property
    def turns_per_session(self) -> int:
        return self.num_turns if self.kind == "multi-turn" else 1

    def describe(self) -> str:
        if self.kind == "random":
            shape = f"random, input {self.input_len}"
        elif self.kind == "shared-prefix":
            shape = f"shared-prefix {self.num_prefixes}x{self.prefix_len} + {self.input_len}"
        else:
            shape = (
                f"multi-turn {self.num_turns} turns of {self.input_len}, "
                f"{self.num_prefixes} system prompts of {self.prefix_len}"
            )
        if self.prefix_zipf:
            shape += f" (prefixes Zipf s={self.prefix_zipf:g})"
        return (
            f"{shape}, output {self.output_len}; Poisson {self.rate:g} sessions/s for {self.duration_s:g} s"
        )


class Workload:
    """The sessions of a `WorkloadSpec`, in arrival order, each generated when it is reached."""

    def __init__(self, spec: WorkloadSpec, pool: WordPool | None = None) -> None:
        spec.validate()
        self.spec = spec
        self.pool = pool or synthetic_pool()
        prefixes = random_dataset(self.pool, spec.num_prefixes, max(spec.prefix_len, 1), spec.seed, stream=10)
        self.prefixes = [list(s.turns[0].prompt) for s in prefixes] if spec.prefix_len else []

    def describe(self) -> str:
        return self.spec.describe()

    def __iter__(self) -> Iterator[SimSession]:
        spec = self.spec
        arrivals = rng_for(spec.seed, STREAM_ARRIVALS)
        picks = rng_for(spec.seed, 11)
        t = 0.0
        index = 0
        weights = None
        if spec.prefix_zipf:
            ranks = [1.0 / (k + 1) ** spec.prefix_zipf for k in range(spec.num_prefixes)]
            weights = [w / sum(ranks) for w in ranks]
        while t < spec.duration_s and (spec.max_sessions is None or index < spec.max_sessions):
            if weights is None:  # (uniform: the draws of runs made before Zipf existed)
                prefix = int(picks.integers(0, spec.num_prefixes))
            else:
                prefix = int(picks.choice(spec.num_prefixes, p=weights))
            yield self._session(index, t, prefix)
            index += 1
            t += float(arrivals.exponential(1.0 / spec.rate))

    def _session(self, index: int, start: float, prefix: int) -> SimSession:
        spec = self.spec
        n = spec.turns_per_session
        # Each session's prompts from its own seed: the same session whatever else changes.
        drawn = random_dataset(self.pool, n, spec.input_len, spec.seed * 1_000_003 + index, stream=12)
        users = [list(s.turns[0].prompt) for s in drawn]
        shared = self.prefixes[prefix] if self.prefixes else None
        if spec.kind == "multi-turn":
            turns = [SimTurn(u, spec.output_len) for u in users]
            return SimSession(index, start, turns, chat=True, system=shared, think_time_s=spec.think_time_s)
        prompt = (shared or []) + users[0] if spec.kind == "shared-prefix" else users[0]
        return SimSession(index, start, [SimTurn(prompt, spec.output_len)])


@dataclass
class TraceWorkload:
    """Replay of a JSON trace: `{"requests": [{"arrival_s", "prompt_len" | "prompt_token_ids", "output_len",
    "max_tokens"?, "prefix_group"?, "prefix_len"?, "session"?, "cache_salt"?}, ...]}`; requests of one
    `session` are turns of one conversation (sent in order, each after the previous ends); a `prefix_group`
    shares its first `prefix_len` tokens. A `deepflow bench serve --json` file replays too (its `start_ms`,
    `prompt_len`, `output_tokens`, `session`, `turn`)."""

    path: Path
    seed: int = 0
    pool: WordPool = field(default_factory=synthetic_pool)

    def describe(self) -> str:
        return f"trace {self.path}"

    def _entries(self) -> list[dict[str, Any]]:
        data = json.loads(Path(self.path).read_text(encoding="utf-8"))
        entries = data["requests"] if isinstance(data, dict) else data
        out = []
        for e in entries:
            if "start_ms" in e:  # a bench report
                if e.get("start_ms") is None:
                    continue
                e = {
                    "arrival_s": e["start_ms"] / 1e3,
                    "prompt_len": e["prompt_len"],
                    "output_len": max(int(e.get("output_tokens") or 1), 1),
                    "session": e.get("session"),
                    "turn": e.get("turn", 0),
                }
            out.append(e)
        return out

    def __iter__(self) -> Iterator[SimSession]:
        entries = self._entries()
        groups: dict[Any, list[dict[str, Any]]] = {}
        order: list[Any] = []
        for i, e in enumerate(entries):
            key = e.get("session", f"#{i}")
            key = f"#{i}" if key is None else key
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(e)
        rng = rng_for(self.seed, 13)
        prefixes: dict[Any, list[int]] = {}
        sessions = []
        for index, key in enumerate(order):
            turns = sorted(groups[key], key=lambda e: (e.get("turn", 0), e["arrival_s"]))
            sim_turns = []
            for e in turns:
                if "prompt_token_ids" in e:
                    prompt = [int(t) for t in e["prompt_token_ids"]]
                else:
                    n = int(e["prompt_len"])
                    group = e.get("prefix_group")
                    shared: list[int] = []
                    if group is not None:
                        k = min(int(e.get("prefix_len", 0)), n)
                        if group not in prefixes or len(prefixes[group]) < k:
                            prefixes[group] = self.pool.token_ids(self.pool.draw(rng, k))
                        shared = prefixes[group][:k]
                    prompt = shared + self.pool.token_ids(self.pool.draw(rng, n - len(shared)))
                output_len = int(e["output_len"])
                sim_turns.append(SimTurn(prompt, output_len, e.get("max_tokens")))
            sessions.append(
                SimSession(
                    index, float(turns[0]["arrival_s"]), sim_turns, cache_salt=turns[0].get("cache_salt", "")
                )
            )
        sessions.sort(key=lambda s: (s.start_s, s.index))
        yield from sessions
