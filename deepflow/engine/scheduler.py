"""FlowServe's centralized scheduler: pure logic (no torch, no sockets), one token budget per step.

There are no prefill and decode phases: each step every running request asks for the tokens it has not
computed yet (one for a decode, a chunk for a prefill), capped by `max_num_batched_tokens`, and waiting
requests are admitted while budget, `max_num_seqs` and KV blocks allow. When blocks run out, the running
request with the lowest priority (latest arrival) is preempted: its blocks are freed and it is recomputed
later. Scheduling only needs token *counts*, so step N+1 can be planned while step N runs (paper §4.2): a
request whose step will sample counts one pending token until the sampled id arrives.

Progress: the highest-priority unfinished request always gets its blocks eventually. Running requests are
served in priority order, so a victim is always of lower priority than the request that needs its blocks.
Blocks that waiting requests hold for a finished populate are a reservation, not a right: a request that
cannot get blocks takes them back from every lower-priority waiter before it preempts anyone (a head of the
queue blocked by the populated blocks of requests behind it was a livelock). Admission is first-come within
a priority and stops at the first request that does not fit, so the running requests drain in front of it.
What remains held then is only pinned contexts, capped below the pool by `max_context_tokens`; a request
that could not fit even beside the largest allowed pins is refused by `add_request`.

KV blocks come from the Relational Tensor Cache (`deepflow.cache.rtc`): on admission a request starts from its
longest cached prefix (or waits while the prefix is populated back from the host tier), and every request
publishes the blocks it has computed, so later requests (and its own resumption after preemption) reuse them.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

from deepflow.cache.rtc import PrefixMatch, RelationalTensorCache
from deepflow.engine.request import (
    CachedRequestData,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    ModelRunnerOutput,
    NewRequestData,
    Request,
    RequestStatus,
    SchedulerOutput,
    SchedulerStats,
)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs, max_num_batched_tokens must be >= 1 and max_model_len >= 2")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill max_num_batched_tokens must be >= max_model_len")


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        cache: RelationalTensorCache,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock`: seconds, for queue times and context TTLs (the simulator passes its virtual clock)."""
        self.config = config
        self.cache = cache
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # kept sorted by (priority, arrival)
        self.running: list[Request] = []  # by (priority, arrival) from each step on; admission order between
        self._forget: list[str] = []  # executor state to drop at the next step
        self._preempted: list[str] = []  # executor KV state to drop at the next step
        self.num_preemptions_total = 0

    # ---- requests in and out -------------------------------------------------------------------------
    def add_request(self, core_request: EngineCoreRequest) -> None:
        if core_request.request_id in self.requests:
            raise ValueError(f"request id {core_request.request_id!r} is already in use")
        prompt_len = len(core_request.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("the prompt must contain at least one token")
        if prompt_len >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {prompt_len} tokens; the model's context is {self.config.max_model_len} tokens "
                "and at least one must remain for the output"
            )
        request = Request(core_request, self.config.max_model_len, self.clock)
        needed = self.cache.blocks_for(min(prompt_len + request.max_tokens, self.config.max_model_len))
        room = self.cache.num_blocks - self.cache.max_context_tokens // self.cache.block_size
        if needed > room:
            raise ValueError(
                f"the request may need {needed} KV blocks of {self.cache.block_size} tokens, more than the "
                f"{room} the pool keeps free of pinned contexts: lower max_tokens or the prompt"
            )
        if request.create_context is not None:
            self.cache.reserve_context(request.create_context.context_id, prompt_len)
        self.requests[request.request_id] = request
        self._enqueue(request)

    def abort(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request)
                outputs.append(
                    EngineCoreOutput(
                        request_id=request_id, new_token_ids=[], finish_reason=FinishReason.ABORT
                    )
                )
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_executor_updates(self) -> bool:
        """Finished or preempted requests the executor has not been told to forget yet."""
        return bool(self._forget or self._preempted)

    def stats(self) -> SchedulerStats:
        """Gauges and counters as they are now: a pure read, any caller, any number of times. Its
        `populate_latencies` is empty: those are drained once, by `step_stats`."""
        cache = self.cache.stats
        outstanding = sum(
            max(r.num_tokens - r.num_computed_tokens, 0) + max(r.max_tokens - r.num_output_tokens, 0)
            for r in self.requests.values()
        )
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            outstanding_tokens=outstanding,
            kv_cache_usage=self.cache.usage(),
            num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queries_total=cache.queries_tokens,
            prefix_cache_hits_total=cache.device_hit_tokens + cache.host_hit_tokens,
            prefix_cache_host_hits_total=cache.host_hit_tokens,
            kv_blocks_evicted_total=cache.device_evicted_blocks,
            host_blocks_evicted_total=cache.host_evicted_blocks,
            pinned_context_tokens=self.cache.pinned_context_tokens(),
        )

    def take_populate_latencies(self) -> list[float]:
        """The populate latencies measured since the last call (drained: each is reported once)."""
        cache = self.cache.stats
        latencies, cache.populate_latencies = cache.populate_latencies, []
        return latencies

    def step_stats(self) -> SchedulerStats:
        """`stats()` with the populate latencies since the last call: what the engine loop sends with each
        step's outputs (the front end's metrics observe each latency once). The loop is its one caller;
        heartbeats and snapshots read `stats()`."""
        stats = self.stats()
        stats.populate_latencies = self.take_populate_latencies()
        return stats

    # ---- explicit contexts and cache admin --------------------------------------------------------------
    def release_context(self, context_id: str) -> bool:
        return self.cache.release_context(context_id)

    def reset_prefix_cache(self) -> int:
        return self.cache.reset()

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.cache.expire_contexts(self.clock())
        # Highest priority first (stable: admission order among equals), so a victim is never ahead.
        self.running.sort(key=lambda r: r.sort_key)
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_requests: list[NewRequestData] = []
        cached_requests: list[CachedRequestData] = []
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._tokens_wanted(request, budget)
            if num_new == 0:
                index += 1
                continue
            new_blocks = self.cache.append_block(request.request_id, request.num_computed_tokens + num_new)
            if new_blocks is None and self._reclaim_populates(request):
                new_blocks = self.cache.append_block(
                    request.request_id, request.num_computed_tokens + num_new
                )
            while new_blocks is None:
                victim = self._pick_victim(index)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.cache.append_block(
                    request.request_id, request.num_computed_tokens + num_new
                )
            if new_blocks is None:
                continue  # the request preempted itself; `running[index]` is now the next one
            cached_requests.append(CachedRequestData(request_id=request.request_id, new_block_ids=new_blocks))
            self._account(request, num_new, num_scheduled)
            budget -= num_new
            index += 1

        # Admitting new work right after a preemption would only thrash the KV pool.
        if not preempted:
            budget = self._admit_waiting(budget, num_scheduled, new_requests)

        forget, self._forget = self._forget, []
        preempted_ids, self._preempted = self._preempted, []
        return SchedulerOutput(
            new_requests=new_requests,
            cached_requests=cached_requests,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_request_ids=forget,
            preempted_request_ids=preempted_ids,
            kv_transfers=self.cache.take_transfers(),
        )

    def update_from_output(self, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Record sampled tokens, finish requests that stop, return what each request produced."""
        self.cache.transfers_done(runner_output.finished_transfer_ids)
        self.cache.observe_step(
            runner_output.num_tokens,
            runner_output.step_seconds,
            runner_output.copied_blocks,
            runner_output.copy_seconds,
        )
        outputs = []
        for request_id, token_id, logprobs in zip(
            runner_output.request_ids, runner_output.sampled_token_ids, runner_output.logprobs, strict=False
        ):
            request = self.requests.get(request_id)
            if request is None:  # finished or aborted while this step was in flight: the token is moot
                continue
            request.num_pending_tokens -= 1
            request.output_token_ids.append(token_id)
            reason, stop_token = request.check_stop()
            if reason is not None:
                self._finish(request)
            first = len(request.output_token_ids) == 1 and request.first_scheduled_time is not None
            outputs.append(
                EngineCoreOutput(
                    request_id=request_id,
                    new_token_ids=[token_id],
                    new_logprobs=[logprobs] if logprobs is not None else [],
                    finish_reason=reason,
                    stop_reason=stop_token,
                    num_cached_tokens=request.num_cached_tokens,
                    queue_time=request.first_scheduled_time - request.arrival_time if first else None,
                    context_pinned_tokens=request.context_pinned_tokens,
                )
            )
        return outputs

    # ---- internals ---------------------------------------------------------------------------------
    def _tokens_wanted(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining <= 0:
            return 0
        num_new = min(remaining, budget)
        will_sample = num_new == remaining
        if will_sample and request.num_output_tokens >= request.max_tokens:
            return 0  # its last token is already in flight; sampling more would be thrown away
        return num_new

    def _account(self, request: Request, num_new: int, num_scheduled: dict[str, int]) -> None:
        num_scheduled[request.request_id] = num_new
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.num_pending_tokens += 1
        # Published at once: a request admitted later in this pass may share these blocks, since each layer
        # writes the whole batch's K/V before any attention reads them.
        self._commit(request)

    def _admit_waiting(
        self, budget: int, num_scheduled: dict[str, int], new_requests: list[NewRequestData]
    ) -> int:
        admitted: list[Request] = []
        for request in self.waiting:
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.num_pending_tokens:
                continue  # preempted with a token still in flight: its ids are not all known yet
            if not self.cache.query_populate(request.request_id):
                continue  # its prefix is still being copied in from the host tier
            match = self._match(request)
            if match is not None and match.pending is not None:
                continue  # another request's populate is bringing this prefix in: wait for it
            if (
                match is not None
                and match.host
                and not self.cache.is_populating(request.request_id)
                and self.cache.should_populate(match)
                and self.cache.populate(request.request_id, match)
            ):
                continue
            cached = match.num_device_tokens if match is not None else 0
            remaining = request.num_tokens - cached
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget)
            namespace = match.namespace if match is not None else request.cache_salt
            table = self.cache.alloc_blocks(request.request_id, namespace, match, cached + num_new)
            if table is None and self._reclaim_populates(request):
                # The failed allocation may have split nodes of the match: look it up again.
                match = self._match(request)
                if match is not None and (match.pending is not None or match.host):
                    break  # what it matched moved; it tries again next step, still first in line
                cached = match.num_device_tokens if match is not None else 0
                num_new = min(request.num_tokens - cached, budget)
                table = self.cache.alloc_blocks(request.request_id, namespace, match, cached + num_new)
            if table is None:
                break  # first come, first served: nobody behind it takes the blocks it waits for
            # The RTC's word, not the match's: it may give up a partial-block hit to find the blocks.
            cached = self.cache.num_cached_tokens(request.request_id)
            request.num_computed_tokens = cached
            new_requests.append(
                NewRequestData(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    eos_token_ids=sorted(request.eos_token_ids),
                    block_ids=list(table),
                    num_computed_tokens=cached,
                )
            )
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
                # Whole blocks only, as vLLM reports: a token-exact count would tell a client how much of
                # its prompt another client sent (a partial-block hit is still reused, just not reported).
                bs = self.cache.block_size
                request.num_cached_tokens = min(cached, len(request.prompt_token_ids)) // bs * bs
                self.cache.stats.queries_tokens += len(request.prompt_token_ids)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            self._account(request, num_new, num_scheduled)
            budget -= num_new
        for request in admitted:
            self.waiting.remove(request)
        return budget

    def _match(self, request: Request) -> PrefixMatch | None:
        """The request's cached prefix, leaving out its last token (whose logits must be computed)."""
        # Without prefix caching a context's creator still commits its blocks (to pin them); resumed after a
        # preemption it must match them: else it computes a second copy, its commits lock the first one
        # again (the tree keeps the first), and a request that fits alone needs twice its blocks and
        # preempts itself forever.
        implicit = self.cache.enable_prefix_caching or (
            request.create_context is not None and request.num_preemptions > 0
        )
        if request.context_id is None and not implicit:
            return None
        tokens = (request.prompt_token_ids + request.output_token_ids)[: request.num_tokens - 1]
        if request.context_id is not None:
            match = self.cache.match_by_id(request.context_id, tokens)
            if match is not None:
                return match
            if not implicit:
                return None
        return self.cache.match_by_prefix_tokens(request.cache_salt, tokens)

    def _commit(self, request: Request) -> None:
        """Publish the request's computed whole blocks, so that others (and its own resumption) reuse them."""
        if not self.cache.enable_prefix_caching and request.create_context is None:
            return
        bs = self.cache.block_size
        known = len(request.prompt_token_ids) + len(request.output_token_ids)
        if min(known, request.num_computed_tokens) // bs > self.cache.num_committed_blocks(
            request.request_id
        ):
            self.cache.commit(
                request.request_id,
                request.prompt_token_ids + request.output_token_ids,
                request.num_computed_tokens,
            )

    def _reclaim_populates(self, request: Request) -> bool:
        """Take back the blocks that lower-priority waiting requests hold for their populates (they stay
        cached, now evictable; the waiters match them again when their turn comes). True if any were held."""
        reclaimed = False
        for waiter in reversed(self.waiting):
            if waiter.sort_key <= request.sort_key:
                break
            if self.cache.is_populating(waiter.request_id):
                self.cache.cancel_populate(waiter.request_id)
                reclaimed = True
        return reclaimed

    def _pick_victim(self, index: int) -> Request:
        """The lowest-priority, latest request not yet scheduled this step; else the current one."""
        candidates = self.running[index:]
        return max(candidates, key=lambda r: r.sort_key)

    def _preempt(self, request: Request) -> None:
        self._commit(request)
        self.cache.free(request.request_id)
        self.running.remove(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions_total += 1
        self._preempted.append(request.request_id)
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        keys = [r.sort_key for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, request.sort_key), request)

    def _finish(self, request: Request) -> None:
        # The one exit path of a request: whatever it holds goes back here.
        self._commit(request)
        context = request.create_context
        if context is not None:
            if request.status == RequestStatus.RUNNING and request.output_token_ids:
                request.context_pinned_tokens = self.cache.pin_context(
                    context.context_id,
                    request.request_id,
                    request.prompt_token_ids,
                    self.clock() + context.ttl_seconds,
                )
            else:
                self.cache.unreserve_context(context.context_id)
        self.cache.free(request.request_id)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if request.status != RequestStatus.WAITING:  # the executor has seen it
            self._forget.append(request.request_id)
        request.status = RequestStatus.FINISHED
        del self.requests[request.request_id]
