"""`run_benchmark`: build the workload, warm up, drive it closed- or open-loop, and summarize.

Closed loop (`concurrency` workers, each sending its next request when the last one ends) measures the
server at a fixed load; open loop (Poisson arrivals at `rps`) measures it under a fixed offered rate, where
queueing shows up in TTFT. Both stop by themselves: the workload is finite and every request has a timeout.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import httpx
from tqdm import tqdm

from deepflow import __version__
from deepflow.bench.client import RequestRecord, chat_payload, completions_payload, stream_request
from deepflow.bench.clock import SYSTEM_CLOCK, Clock
from deepflow.bench.config import BenchConfig
from deepflow.bench.datasets import (
    STREAM_ARRIVALS,
    STREAM_WARMUP,
    Session,
    build_dataset,
    chat_messages,
    random_dataset,
    rng_for,
)
from deepflow.bench.report import BenchResult, summarize
from deepflow.bench.tokens import TextTokenizer, WordPool, build_word_pool, resolve_tokenizer

__all__ = ["BenchConfig", "BenchResult", "poisson_arrivals", "run_benchmark"]


def poisson_arrivals(n: int, rps: float, seed: int) -> list[float]:
    """Start offsets (s) of `n` arrivals of a Poisson process at `rps`/s; the first one at 0."""
    if n <= 0:
        return []
    gaps = rng_for(seed, STREAM_ARRIVALS).exponential(1.0 / rps, size=n)
    gaps[0] = 0.0
    return gaps.cumsum().tolist()


class _Runner:
    """Sends sessions with one shared client and collects one record per planned request."""

    def __init__(
        self,
        config: BenchConfig,
        client: httpx.AsyncClient,
        on_done: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config, self.client, self.on_done, self.clock = config, client, on_done, clock
        self.t0 = clock.now()

    def _payload(self, session: Session, turn: int, answers: Sequence[str]) -> dict[str, object]:
        cfg = self.config
        if cfg.resolved_endpoint == "chat":
            messages = chat_messages(session, turn, answers)
            return chat_payload(cfg.model, messages, cfg.output_len, cfg.temperature, cfg.ignore_eos)
        prompt = session.turns[turn].prompt
        return completions_payload(cfg.model, prompt, cfg.output_len, cfg.temperature, cfg.ignore_eos)

    async def session(self, session: Session, first_index: int) -> list[RequestRecord]:
        """The turns of `session` in order; after a failure the rest cannot be sent and fail as `not sent`."""
        records: list[RequestRecord] = []
        answers: list[str] = []
        history = session.system_len  # content tokens of the conversation so far (template excluded)
        for turn_index, turn in enumerate(session.turns):
            history += turn.prompt_len
            record = RequestRecord(first_index + turn_index, session.index, turn_index, history)
            records.append(record)
            if turn_index and not records[turn_index - 1].success:
                record.fail("not sent", f"turn {turn_index - 1} of this conversation failed")
            else:
                record.start_s = self.clock.now() - self.t0
                payload = self._payload(session, turn_index, answers)
                await stream_request(
                    self.client, self.config.path, payload, record, self.config.timeout, self.clock
                )
                answers.append(record.text)
                history += record.output_tokens
            self.on_done()
        return records

    async def closed_loop(self, sessions: Sequence[Session], workers: int) -> list[RequestRecord]:
        starts = _first_indices(sessions)
        queue = iter(range(len(sessions)))  # shared by the workers; the event loop makes next() atomic
        records: list[RequestRecord] = []

        async def worker() -> None:
            for i in queue:
                records.extend(await self.session(sessions[i], starts[i]))

        await asyncio.gather(*(worker() for _ in range(min(workers, len(sessions)))))
        return records

    async def open_loop(
        self, sessions: Sequence[Session], arrivals: Sequence[float], cap: int | None
    ) -> list[RequestRecord]:
        starts = _first_indices(sessions)
        limit = asyncio.Semaphore(cap) if cap else None

        async def one(i: int) -> list[RequestRecord]:
            if limit is None:
                return await self.session(sessions[i], starts[i])
            async with limit:
                return await self.session(sessions[i], starts[i])

        tasks = []
        for i, at in enumerate(arrivals):
            await self.clock.sleep_until(self.t0 + at)
            tasks.append(asyncio.create_task(one(i)))
        return [r for batch in await asyncio.gather(*tasks) for r in batch]


def _first_indices(sessions: Sequence[Session]) -> list[int]:
    """Global index of each session's first request (sessions in order, turns in order)."""
    starts, n = [], 0
    for s in sessions:
        starts.append(n)
        n += len(s.turns)
    return starts


def _prepare(config: BenchConfig) -> tuple[TextTokenizer, list[Session], list[Session]]:
    """Tokenizer, workload and warm-up sessions (blocking: tokenizer files or the server's /tokenize)."""
    tokenizer = resolve_tokenizer(config.tokenizer, config.root_url, config.model, config.api_key)
    pool: WordPool = build_word_pool(tokenizer)
    as_text = config.resolved_endpoint == "chat"
    text_tokenizer = tokenizer if as_text else None  # token-id prompts are exact without a check
    sessions = build_dataset(
        config.dataset,
        pool,
        num=config.num_prompts,
        input_len=config.input_len,
        seed=config.seed,
        prefix_len=config.prefix_len,
        num_turns=config.num_turns,
        as_text=as_text,
        tokenizer=text_tokenizer,
    )
    # Warm-up prompts are random (their own seed stream) so they do not pre-fill a shared prefix.
    warmup = random_dataset(
        pool, config.warmup, config.input_len, config.seed, as_text, text_tokenizer, STREAM_WARMUP
    )
    close = getattr(tokenizer, "close", None)
    if callable(close):
        close()
    return tokenizer, sessions, warmup


async def run_benchmark(
    config: BenchConfig,
    *,
    clock: Clock | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BenchResult:
    """Run one benchmark against `config.base_url` and return its records and summary.

    `clock` (default: real time, `SystemClock`) takes every time and makes every wait of the run; tests
    pass a virtual one. `transport` replaces httpx's network transport for the streamed requests (tests
    route them to an in-process fake server; connection limits then do not apply). The tokenizer still
    reaches `/tokenize` over the network.
    """
    clock = clock or SYSTEM_CLOCK
    config.validate()
    # Building prompts may call the server's /tokenize: keep the event loop free (it may host the server).
    tokenizer, sessions, warmup_sessions = await asyncio.to_thread(_prepare, config)
    workers = config.workers
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    total = sum(len(s.turns) for s in sessions)
    async with httpx.AsyncClient(
        base_url=config.root_url,
        headers=headers,
        limits=limits,
        timeout=httpx.Timeout(config.timeout),
        transport=transport,
    ) as client:
        warmup: list[RequestRecord] = []
        if warmup_sessions:
            warm = _Runner(config, client, lambda: None, clock)
            warmup = await warm.closed_loop(warmup_sessions, workers or len(warmup_sessions))
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        with tqdm(
            total=total,
            desc=config.label or "bench",
            unit="req",
            file=sys.stderr,
            disable=not config.progress,
        ) as bar:
            runner = _Runner(config, client, lambda: bar.update(1), clock)
            if config.rps is None:
                records = await runner.closed_loop(sessions, workers or 1)
            else:
                arrivals = poisson_arrivals(len(sessions), config.rps, config.seed)
                records = await runner.open_loop(sessions, arrivals, config.concurrency)
            duration = clock.now() - runner.t0
    records.sort(key=lambda r: r.index)
    return BenchResult(
        config=config,
        summary=summarize(records, duration, warmup),
        records=records,
        tokenizer=tokenizer.description,
        started_at=started_at,
        version=__version__,
    )
