"""A simulated task executor: the real `Scheduler` and `RelationalTensorCache`, built from an `EngineConfig`
the way `EngineCore` builds them, a `SimRunner` in place of the model, and the engine loop (`run_core_loop`
around `EngineCore.step`, synchronous or asynchronous scheduling) replayed on the virtual clock.

The model thread is a resource that is busy until a time: with async scheduling step N+1 is planned while
step N runs and starts when it ends; a step longer than `async_max_step_tokens` is collected before the next
is planned, as the real core does. Requests that arrive while the loop waits for a step are taken at the
next pass of the loop, as the real loop drains its commands between steps. After each pass that produced
outputs, took commands or changed the cache, the TE reports to its JE: outputs, `step_stats()`, KV events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from deepflow.cache.events import KVEvent
from deepflow.cache.rtc import RelationalTensorCache
from deepflow.engine.config import EngineConfig
from deepflow.engine.request import (
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    ModelRunnerOutput,
    SchedulerStats,
)
from deepflow.engine.scheduler import Scheduler, SchedulerConfig
from deepflow.sim.costmodel import ModelShape
from deepflow.sim.events import EventLoop
from deepflow.sim.runner import SimRunner

__all__ = ["EngineLayout", "SimTE", "engine_layout"]

logger = logging.getLogger(__name__)

# (te, outputs, stats, kv events) -> None
Emit = Callable[["SimTE", list[EngineCoreOutput], SchedulerStats, list[KVEvent]], None]


@dataclass(frozen=True)
class EngineLayout:
    """What `EngineCore.__init__` derives from its config and its model: pool sizes and limits."""

    num_blocks: int
    num_host_blocks: int
    max_model_len: int
    max_context_tokens: int


def engine_layout(config: EngineConfig, model: ModelShape) -> EngineLayout:
    """Pool sizes as `ModelRunner` computes them and limits as `EngineCore` does, without loading a model.
    (tests/sim checks it against a real EngineCore.)"""
    per_block = model.kv_bytes_per_block(config.block_size)
    num_blocks = config.num_kv_blocks or max(config.kv_cache_memory // per_block, 1)
    num_host_blocks = (
        config.num_host_blocks
        if config.num_host_blocks is not None
        else config.host_cache_memory // per_block
    )
    pool_tokens = num_blocks * config.block_size
    limit = model.max_position_embeddings
    max_model_len = min(config.max_model_len or limit, limit)
    if model.sliding_window and max_model_len > model.sliding_window:
        max_model_len = model.sliding_window
    max_model_len = min(max_model_len, pool_tokens)
    context_room = pool_tokens - max_model_len
    max_context_tokens = min(
        config.max_context_tokens if config.max_context_tokens is not None else pool_tokens // 2, context_room
    )
    return EngineLayout(num_blocks, num_host_blocks, max_model_len, max_context_tokens)


class SimTE:
    def __init__(
        self,
        te_id: str,
        config: EngineConfig,
        model: ModelShape,
        runner: SimRunner,
        loop: EventLoop,
        emit: Emit,
        *,
        light_reports: bool = True,
    ) -> None:
        """`light_reports`: report with `report()` (what the policies read; fast) rather than the engine
        loop's `step_stats()` (the same loads, plus tree walks for the KV usage)."""
        self.te_id = te_id
        self.light_reports = light_reports
        self.config = config
        self.loop = loop
        self.emit = emit
        self.runner = runner
        self.layout = layout = engine_layout(config, model)
        self.max_model_len = layout.max_model_len
        clock = loop.clock
        self.cache = RelationalTensorCache(
            layout.num_blocks,
            config.block_size,
            layout.num_host_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            max_context_tokens=layout.max_context_tokens,
            clock=clock,
            kv_events=config.kv_events,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=layout.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.cache,
            clock=clock,
        )
        self._async = config.async_scheduling
        self._long_limit: int | None = getattr(config, "async_max_step_tokens", None)
        self._inbox: list[EngineCoreRequest] = []
        self._inflight: tuple[ModelRunnerOutput, float] | None = None  # (its output, when it ends)
        self._inflight_long = False
        self._model_free_at = 0.0
        self._awake = False  # a pass of the loop is scheduled or waiting on a step
        self.num_passes = 0

    # ---- commands ---------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        self._inbox.append(request)
        if not self._awake:
            self._awake = True
            self.loop.at(self.loop.now, self._pass)

    def has_work(self) -> bool:
        s = self.scheduler
        return s.has_unfinished_requests() or s.has_executor_updates() or self._inflight is not None

    # ---- the loop -----------------------------------------------------------------------------------
    def _take_commands(self) -> tuple[list[EngineCoreOutput], bool]:
        outputs: list[EngineCoreOutput] = []
        inbox, self._inbox = self._inbox, []
        for request in inbox:
            try:
                self.scheduler.add_request(request)
            except ValueError as exc:  # as run_core_loop answers a request the engine refuses
                outputs.append(
                    EngineCoreOutput(
                        request_id=request.request_id,
                        new_token_ids=[],
                        finish_reason=FinishReason.ABORT,
                        stop_reason=str(exc),
                        error_type="invalid",
                    )
                )
        return outputs, bool(inbox)

    def _pass(self) -> None:
        """One pass of `run_core_loop`: commands, then `EngineCore.step`; its collection may wait."""
        self.num_passes += 1
        outputs, handled = self._take_commands()
        if not self.has_work():
            self._awake = False
            self._report(outputs, handled)
            return
        now = self.loop.now
        if self._inflight is not None and self._inflight_long:
            result, done = self._inflight
            self._inflight = None
            self.loop.at(max(done, now), self._collect, result, outputs, handled)
            return
        scheduled = self.scheduler.schedule()
        if not self._async:
            if not scheduled.has_executor_work and not outputs:
                self._awake = False  # nothing can change until a command arrives (the real loop would spin)
                self._report(outputs, handled)
                return
            result = self.runner.execute(scheduled)
            self.loop.at(now + result.step_seconds, self._collect, result, outputs, handled)
            return
        launched = None
        if scheduled.has_executor_work:
            result = self.runner.execute(scheduled)
            start = max(now, self._model_free_at)
            self._model_free_at = start + result.step_seconds
            launched = (result, self._model_free_at)
        previous, self._inflight = self._inflight, launched
        limit = self._long_limit
        self._inflight_long = limit is not None and scheduled.total_num_scheduled_tokens > limit
        if previous is not None:
            self.loop.at(max(previous[1], now), self._collect, previous[0], outputs, handled)
        elif launched is None and not outputs and not self.scheduler.has_executor_updates():
            # Nothing runs and nothing can change until a command arrives (the real loop would spin).
            self._awake = False
            self._report(outputs, handled)
        else:
            self._report(outputs, handled)
            self.loop.at(now, self._pass)

    def _collect(self, result: ModelRunnerOutput, outputs: list[EngineCoreOutput], handled: bool) -> None:
        outputs.extend(self.scheduler.update_from_output(result))
        self._report(outputs, handled)
        self.loop.at(self.loop.now, self._pass)

    def _report(self, outputs: list[EngineCoreOutput], handled: bool) -> None:
        events = self.cache.take_events()
        if outputs or handled or events:
            self.emit(
                self, outputs, self.report() if self.light_reports else self.scheduler.step_stats(), events
            )

    def report(self) -> SchedulerStats:
        """What the JE's policies read of a report (`num_running`, `num_waiting`, `outstanding_tokens`), as
        `Scheduler.stats()` computes them, without its O(cached blocks) walks of the radix tree: the KV
        usage here counts cached-but-reclaimable blocks as used, and the counters are left at zero. (The
        populate latencies are drained, as the engine loop does, so they do not pile up.)"""
        s = self.scheduler
        s.take_populate_latencies()
        # `Request.num_tokens` / `num_output_tokens` inlined: this runs after every step of every TE.
        outstanding = 0
        for r in s.requests.values():
            outputs = len(r.output_token_ids) + r.num_pending_tokens
            left = len(r.prompt_token_ids) + outputs - r.num_computed_tokens
            budget = r.max_tokens - outputs
            outstanding += (left if left > 0 else 0) + (budget if budget > 0 else 0)
        cache = self.cache
        return SchedulerStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            outstanding_tokens=outstanding,
            kv_cache_usage=1.0 - cache.num_free_blocks / cache.num_blocks,
            num_preemptions_total=s.num_preemptions_total,
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
        )
