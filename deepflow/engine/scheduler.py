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

Disaggregated requests (engine/kv_transfer.py) go through the scheduler side of the KV connector
(`engine/kv_connector/scheduler.py`). A decode request (KVConsume) reserves its prompt's blocks (past its own
whole-block prefix hit) in the admission pass, answers with a `KVSink`, and waits in the queue — like a
request whose prefix is being populated — until every byte and the first token are here; it then runs as a
request whose prompt is computed. A prefill request (KVProduce) prefills as any other, samples one token,
leaves the running list (SENDING_KV) and ends when the runner side reports the decode TE's acknowledgements.
Either kind leaves through `_finish`, which keeps its blocks while DistFlow may still touch them.

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
from deepflow.engine.kv_connector.base import KVConnectorOutput, SendStatus
from deepflow.engine.kv_connector.scheduler import (
    ConsumerState,
    HoldKind,
    KVConnectorScheduler,
    ProducerState,
)
from deepflow.engine.kv_transfer import KVConsume, KVPrefilled, KVProduce
from deepflow.engine.request import (
    CachedRequestData,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    KVProduceStart,
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
        kv_connector: KVConnectorScheduler | None = None,
    ) -> None:
        """`clock`: seconds, for queue times, context TTLs and the KV connector's deadlines (the simulator
        passes its virtual clock). `kv_connector`: this engine takes part in prefill/decode disaggregation."""
        self.config = config
        self.cache = cache
        self.clock = clock
        self.kv = kv_connector
        self._kv_outputs: list[EngineCoreOutput] = []  # outputs made outside a step's tokens (sinks, ends)
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
        transfer = core_request.kv_transfer
        if transfer is not None and self.kv is None:
            raise ValueError("this engine was not started with kv_transfer: it cannot take part in PD")
        if self.kv is not None and self.kv.is_held(core_request.request_id):
            raise ValueError(f"request id {core_request.request_id!r} is still in use (its KV transfer)")
        if transfer is not None and (core_request.create_context is not None or core_request.context_id):
            raise ValueError("a disaggregated request cannot create or use a pinned context")
        if isinstance(transfer, KVConsume) and core_request.sampling_params.n != 1:
            raise ValueError("a disaggregated request has n=1")
        request = Request(core_request, self.config.max_model_len, self.clock)
        if isinstance(transfer, KVProduce):
            # One token: the first, which the decode TE continues from.
            request.max_tokens = 1
            bs = self.cache.block_size
            if len(transfer.sink.block_ids) != self.cache.blocks_for(prompt_len):
                raise ValueError(
                    f"the sink has {len(transfer.sink.block_ids)} blocks for a {prompt_len}-token prompt "
                    f"(block size {bs})"
                )
            if transfer.sink.num_local_tokens % bs or not 0 <= transfer.sink.num_local_tokens < prompt_len:
                raise ValueError(f"the sink's num_local_tokens {transfer.sink.num_local_tokens} is invalid")
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
        if isinstance(transfer, KVConsume):
            assert self.kv is not None
            self.kv.add_consumer(request.request_id, transfer, self.clock())
        elif isinstance(transfer, KVProduce):
            assert self.kv is not None
            self.kv.add_producer(request.request_id, transfer)
        self._enqueue(request)

    def kv_prefilled(self, command: KVPrefilled) -> list[EngineCoreOutput]:
        """The prefill side's first token for a decode request (unknown ids: a no-op). It becomes the
        request's first output token, not reported again; the request may stop right there."""
        consumer = self.kv.consumers.get(command.request_id) if self.kv is not None else None
        request = self.requests.get(command.request_id)
        if consumer is None or request is None or consumer.first_token is not None:
            return []
        if consumer.state is not ConsumerState.WAITING:
            return []  # the protocol sends it after the sink; anything else is a stale or early message
        consumer.first_token = command.first_token_id
        request.output_token_ids.append(command.first_token_id)
        reason, stop_token = request.check_stop()
        if reason is None:
            return []
        self._finish(request)
        return [
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=reason,
                stop_reason=stop_token,
                num_cached_tokens=request.num_cached_tokens,
            )
        ]

    def take_kv_outputs(self) -> list[EngineCoreOutput]:
        """Outputs the KV connector made since the last call: sinks, and requests it ended."""
        outputs, self._kv_outputs = self._kv_outputs, []
        return outputs

    def has_kv_work(self) -> bool:
        """Blocks held past their request's end, for DistFlow: the loop must keep polling the runner."""
        return self.kv is not None and self.kv.has_work()

    def _end_quarantine(self, request_id: str) -> bool:
        """A quarantined request's blocks go back once the prefill side is known to be done with them
        (its last write or its abort notice arrived): True if it was quarantined."""
        hold = self.kv.holds.get(request_id)
        if hold is None or hold.kind is not HoldKind.QUARANTINE:
            return False
        self.kv.release(request_id)
        self.cache.free(request_id)
        return True

    def update_kv_connector_output(self, out: KVConnectorOutput) -> None:
        """Fold in what the runner side saw: prefill sends done or failed, decode sinks complete or
        abandoned by their prefill side."""
        kv = self.kv
        if kv is None or out.empty:
            return
        for request_id, status in out.sends.items():
            hold = kv.holds.get(request_id)
            if hold is not None and hold.kind is HoldKind.IN_FLIGHT:
                kv.release(request_id)
                self.cache.free(request_id)
                continue
            producer = kv.producers.get(request_id)
            request = self.requests.get(request_id)
            if producer is None or request is None or producer.status is not None:
                continue
            producer.status = status
            producer.error = out.send_errors.get(request_id, "")
            if status is SendStatus.DONE:
                if producer.state is ProducerState.SENDING:
                    self._end_producer(request)
                # else: the first token is still on its way (an async step); it ends the request then
            else:
                why = producer.error or "the transfer to the decode TE failed"
                self._kv_fail(request, "kv_transfer", why)
        for sink_id in out.received:
            request_id = kv.sink_request(sink_id)
            if request_id is None:
                continue
            if self._end_quarantine(request_id):
                continue
            if (consumer := kv.consumers.get(request_id)) is not None:
                consumer.received = True
        for sink_id in out.peer_aborted:
            request_id = kv.sink_request(sink_id)
            if request_id is None:
                continue
            if self._end_quarantine(request_id):
                continue
            consumer = kv.consumers.get(request_id)
            request = self.requests.get(request_id)
            if consumer is None or request is None or consumer.received:
                continue  # every byte is here already: the prefill side's late abort changes nothing
            consumer.peer_aborted = True
            self._kv_fail(request, "kv_transfer", "the prefill TE aborted the transfer")

    def _end_producer(self, request: Request) -> None:
        self._finish(request)
        self._kv_outputs.append(
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=FinishReason.STOP,
                num_cached_tokens=request.num_cached_tokens,
                kv_transferred=True,
            )
        )

    def _kv_fail(self, request: Request, error_type: str, why: str) -> None:
        self._finish(request)
        self._kv_outputs.append(
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=FinishReason.ABORT,
                stop_reason=why,
                error_type=error_type,
            )
        )

    def _kv_expire(self) -> None:
        """Deadlines on the scheduler's clock: decode waits, prefill leases, quarantines."""
        kv = self.kv
        if kv is None:
            return
        now = self.clock()
        for request_id, consumer in list(kv.consumers.items()):
            if consumer.state is not ConsumerState.DECODING and consumer.deadline <= now:
                self._kv_fail(
                    self.requests[request_id],
                    "kv_timeout",
                    f"the prompt's KV did not arrive within {consumer.consume.timeout_s:g} s",
                )
        for request_id, producer in list(kv.producers.items()):
            if producer.lease_deadline is not None and producer.lease_deadline <= now:
                self._kv_fail(
                    self.requests[request_id],
                    "kv_transfer",
                    f"the decode TE did not acknowledge the KV within the {producer.produce.lease_s:g} s "
                    "lease",
                )
        for request_id in kv.expired_holds(now):
            kv.release(request_id)
            self.cache.free(request_id)

    def _reserve_consumers(self) -> None:
        """Decode requests reserve the blocks for their prompt, first come first served, and answer with
        their sink. Their own whole-block prefix hit stays (the prefill TE sends from there on); a partial
        block is not used (its copy-on-write would land after — and over — the bytes the prefill TE sends)."""
        kv = self.kv
        if kv is None:
            return
        for request in self.waiting:
            consumer = kv.consumers.get(request.request_id)
            if consumer is None or consumer.state is not ConsumerState.UNRESERVED:
                continue
            match = self._match(request)
            if match is not None:
                match.partial_src, match.partial_tokens = None, 0
                match.host, match.pending = [], None  # the device part only: the rest comes from P
            namespace = match.namespace if match is not None else request.cache_salt
            prompt_len = len(request.prompt_token_ids)
            # The first token's slot too: a request whose KV has arrived never waits for a block (a pool
            # full of such requests, each one block short, would wait for one another until they time out).
            table = self.cache.alloc_blocks(request.request_id, namespace, match, prompt_len + 1)
            if table is None:
                break  # first come, first served
            local = self.cache.num_cached_tokens(request.request_id)
            bs = self.cache.block_size
            assert local % bs == 0 and local < prompt_len
            request.num_computed_tokens = local
            request.num_cached_tokens = local
            sink = kv.make_sink(request.request_id, table[: self.cache.blocks_for(prompt_len)], local)
            self._kv_outputs.append(
                EngineCoreOutput(request_id=request.request_id, new_token_ids=[], kv_sink=sink)
            )

    def _admit_consumer(self, request: Request) -> NewRequestData | None:
        """A decode request whose prompt KV is all here: it joins as a request whose prompt is computed and
        whose first output token is known; None when the block for that token is not to be had."""
        prompt_len = len(request.prompt_token_ids)
        if self.cache.append_block(request.request_id, request.num_tokens) is None:
            return None
        request.num_computed_tokens = prompt_len
        return NewRequestData(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            eos_token_ids=sorted(request.eos_token_ids),
            block_ids=list(self.cache.block_table(request.request_id)),
            num_computed_tokens=prompt_len,
        )

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
        kv = self.kv
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
            num_kv_waiting=sum(c.state is not ConsumerState.DECODING for c in kv.consumers.values())
            if kv
            else 0,
            num_kv_sending=sum(p.state is ProducerState.SENDING for p in kv.producers.values()) if kv else 0,
            num_kv_held=len(kv.holds) if kv else 0,
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
        self._kv_expire()
        self._reserve_consumers()
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
                if victim is None:
                    break  # only prefill requests with transfers left below it: it waits a step
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.cache.append_block(
                    request.request_id, request.num_computed_tokens + num_new
                )
            if new_blocks is None:
                if request in self.running and self.running[index] is request:
                    index += 1  # no victim: it skips this step
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
        kv_produce = []
        if self.kv is not None:
            for new in new_requests:
                producer = self.kv.producers.get(new.request_id)
                if producer is not None and producer.state is ProducerState.QUEUED:
                    producer.state = ProducerState.PREFILLING
                    kv_produce.append(
                        KVProduceStart(
                            request_id=new.request_id,
                            sink=producer.produce.sink,
                            mode=str(producer.produce.mode),
                            tag=producer.tag,
                            timeout_s=producer.produce.lease_s,
                        )
                    )
        return SchedulerOutput(
            kv_produce=kv_produce,
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
            producer = self.kv.producers.get(request_id) if self.kv is not None else None
            if producer is not None:
                outputs.append(self._producer_token(request, token_id, logprobs))
                continue
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

    def _producer_token(self, request: Request, token_id: int, logprobs) -> EngineCoreOutput:  # type: ignore[no-untyped-def]
        """A prefill request's one token: streamed at once (not finished, whatever it is: the decode TE
        judges the stop); the request then only waits for the acknowledgements, under its lease."""
        assert self.kv is not None
        producer = self.kv.producers[request.request_id]
        producer.state = ProducerState.SENDING
        producer.lease_deadline = self.clock() + producer.produce.lease_s
        self.running.remove(request)
        request.status = RequestStatus.SENDING_KV
        first = request.first_scheduled_time is not None
        out = EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[token_id],
            new_logprobs=[logprobs] if logprobs is not None else [],
            num_cached_tokens=request.num_cached_tokens,
            queue_time=request.first_scheduled_time - request.arrival_time if first else None,
        )
        if producer.status is SendStatus.DONE:
            self._end_producer(request)  # acknowledged before the token came back (async steps)
        return out

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
            consumer = self.kv.consumers.get(request.request_id) if self.kv is not None else None
            if consumer is not None and consumer.state is not ConsumerState.DECODING:
                if not consumer.ready:
                    continue  # its KV (or first token) is still on its way from the prefill TE
                new = self._admit_consumer(request)
                if new is None:
                    break
                consumer.state = ConsumerState.DECODING
                new_requests.append(new)
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = self.clock()
                    self.cache.stats.queries_tokens += len(request.prompt_token_ids)
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                admitted.append(request)
                num_new = request.num_tokens - request.num_computed_tokens
                self._account(request, num_new, num_scheduled)
                budget -= num_new
                continue
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
            # A prefill request (KVProduce) takes its whole prompt's blocks at once: it is never preempted
            # once its writes may be reading them, so it must never need a block it cannot get.
            whole = len(request.prompt_token_ids) if self._is_producer(request) else 0
            table = self.cache.alloc_blocks(
                request.request_id, namespace, match, max(cached + num_new, whole)
            )
            if table is None and self._reclaim_populates(request):
                # The failed allocation may have split nodes of the match: look it up again.
                match = self._match(request)
                if match is not None and (match.pending is not None or match.host):
                    break  # what it matched moved; it tries again next step, still first in line
                cached = match.num_device_tokens if match is not None else 0
                num_new = min(request.num_tokens - cached, budget)
                table = self.cache.alloc_blocks(
                    request.request_id, namespace, match, max(cached + num_new, whole)
                )
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

    def _is_producer(self, request: Request) -> bool:
        return self.kv is not None and request.request_id in self.kv.producers

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

    def _pick_victim(self, index: int) -> Request | None:
        """The lowest-priority, latest request not yet scheduled this step; else the current one. Never a
        prefill request whose transfers may be reading its blocks (None when only those are left)."""
        candidates = self.running[index:]
        if self.kv is not None:
            candidates = [r for r in candidates if not self.kv.unpreemptable(r.request_id)]
        if not candidates:
            return None
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
        # DistFlow may still touch a disaggregated request's blocks: the connector then keeps them (never
        # leaked: each hold ends on the runner side's report or on a deadline) and the scheduler frees them.
        if self.kv is None or not self.kv.on_finish(request.request_id, self.clock()):
            self.cache.free(request.request_id)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status != RequestStatus.SENDING_KV:
            self.waiting.remove(request)
        if request.status != RequestStatus.WAITING:  # the executor has seen it
            self._forget.append(request.request_id)
        request.status = RequestStatus.FINISHED
        del self.requests[request.request_id]
