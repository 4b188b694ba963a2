"""Async engine: streams each request's output as it is produced and aborts it at any time.

The engine core runs behind an `EngineCoreClient` (`deepflow.engine.core_client`): by default in a process
of its own over ZeroMQ, or on a thread of this process. This asyncio side tokenizes, detokenizes, checks stop
strings, fans outputs out to per-request queues, and observes the latency metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator

from deepflow.engine.config import EngineConfig
from deepflow.engine.contexts import ContextInfo, ContextLimitError, CreateContext
from deepflow.engine.core_client import (
    EngineCoreClient,
    EngineDeadError,
    InprocEngineCoreClient,
    MPEngineCoreClient,
    ReleaseContext,
    ResetPrefixCache,
)
from deepflow.engine.metrics import EngineMetrics
from deepflow.engine.outputs import OutputProcessor, RequestOutput, RequestState
from deepflow.engine.request import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import TokenizerPool

__all__ = ["AsyncLLM", "EngineDeadError", "RequestStream"]

logger = logging.getLogger(__name__)


class _Timing:
    """Per-request latency bookkeeping for the metrics."""

    __slots__ = ("arrival", "first_token", "last_token")

    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None


class RequestStream:
    """One submitted request's outputs, as an async iterator; `release` (or `aclose`) ends it early."""

    def __init__(self, llm: AsyncLLM, state: RequestState, timing: _Timing) -> None:
        self.llm = llm
        self.state = state
        self.timing = timing
        self.request_id = state.request_id
        self.te_ids: list[str] = []  # the TEs serving it, where the core client routes
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False
        self._released = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise EngineDeadError("engine core failed") from item
            # Coalesce what piled up while the consumer was busy.
            while not item.finished and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if isinstance(nxt, BaseException):
                    raise EngineDeadError("engine core failed") from nxt
                item = _merge(item, nxt)
        except BaseException:
            self.release()
            raise
        if item.finished:
            self._done = True
            self.release()
        return item

    def release(self) -> None:
        """Forget the request here and abort what still runs in the core; idempotent."""
        if not self._released:
            self._released = True
            self._done = True
            self.llm._release(self)

    async def aclose(self) -> None:
        self.release()


class AsyncLLM:
    def __init__(
        self,
        config: EngineConfig | None = None,
        client: EngineCoreClient | None = None,
        *,
        in_process: bool = False,
        model_name: str | None = None,
        tokenizer_workers: int = 0,
    ) -> None:
        """`in_process`: run the core on a thread here instead of in its own process.
        `tokenizer_workers`: processes that tokenize prompts for the HTTP edge (0: inline)."""
        self.config = config or EngineConfig()
        if client is None:
            client = InprocEngineCoreClient(self.config) if in_process else MPEngineCoreClient(self.config)
        self.client: EngineCoreClient = client
        self.model_path = self.client.model_path
        self.metrics = EngineMetrics(model_name or self.model_path.name)
        self._timings: dict[str, _Timing] = {}
        self.tokenizer_pool = TokenizerPool(self.model_path, workers=tokenizer_workers)
        self.tokenizer = self.tokenizer_pool.tokenizer
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.client.eos_token_ids))
        self.max_model_len = self.client.max_model_len
        self._processor = OutputProcessor()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._states: dict[str, RequestState] = {}
        self._output_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._context_waiters: dict[str, asyncio.Future[EngineCoreOutput]] = {}
        self._contexts: dict[str, float] = {}  # context id -> expires at (unix time)

    def submit(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        context_id: str | None = None,
        restartable: bool = False,
    ) -> RequestStream:
        """Validate and hand the request to the core now (a routed core picks its TE here); stream later.

        The returned `RequestStream` yields a RequestOutput each time the request advances (the last has
        `finished` set) and names the TEs serving it (`te_ids`). Closing it early aborts the request; it must
        be closed (or read to the end) so the request's bookkeeping is released. `restartable`: the caller
        shows only the final output, so after a TE failure the request may start over elsewhere."""
        params = sampling_params or SamplingParams()
        params.validate()
        if self._dead is not None:
            raise EngineDeadError("engine core is dead") from self._dead
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = (
            (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, list(prompt))
        )
        if not ids:
            raise ValueError("the prompt must contain at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens "
                "and at least one must remain for the output"
            )
        self._ensure_output_task()
        state = RequestState(request_id, text, ids, params, self.tokenizer)
        timing = _Timing()
        stream = RequestStream(self, state, timing)
        self._timings[request_id] = timing
        self._queues[request_id] = stream.queue
        self._states[request_id] = state
        self._processor.add(state)
        try:
            for child_id, seq in state.sequences.items():
                self.client.add_request(
                    EngineCoreRequest(
                        request_id=child_id,
                        prompt_token_ids=ids,
                        sampling_params=seq.params,
                        eos_token_ids=self.eos_token_ids,
                        arrival_time=timing.arrival,
                        priority=priority,
                        cache_salt=cache_salt or "",
                        context_id=context_id,
                        restartable=restartable,
                    )
                )
        except BaseException:
            stream.release()
            raise
        te_of = getattr(self.client, "te_of", None)
        if te_of is not None:
            stream.te_ids = list(dict.fromkeys(t for c in state.sequences if (t := te_of(c)) is not None))
        return stream

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        context_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`submit` and stream: the request reaches the core when iteration starts.

        `cache_salt` namespaces the prefix cache; `context_id` names a pinned context the prompt starts with.
        Closing the iterator early (client gone) aborts the request in the engine.
        """
        stream = self.submit(
            prompt,
            sampling_params,
            request_id,
            priority=priority,
            cache_salt=cache_salt,
            context_id=context_id,
        )
        try:
            async for output in stream:
                yield output
        finally:
            stream.release()

    def _release(self, stream: RequestStream) -> None:
        state, request_id = stream.state, stream.state.request_id
        self._queues.pop(request_id, None)
        self._states.pop(request_id, None)
        self._timings.pop(request_id, None)
        self.metrics.record_finished(_finish_reason(state), time.monotonic() - stream.timing.arrival)
        live = self._processor.remove(state)
        if live and self._dead is None:
            self.client.abort(live)

    async def abort(self, request_id: str) -> None:
        """Stop a request: its stream ends with finish_reason "abort" and its KV blocks are freed."""
        state = self._states.get(request_id)
        if state is not None:
            live = [cid for cid, seq in state.sequences.items() if not seq.output.finished]
            self.client.abort(live)

    # ---- explicit contexts ---------------------------------------------------------------------------------
    async def create_context(
        self,
        prompt_token_ids: list[int],
        *,
        ttl_seconds: float,
        context_id: str | None = None,
        cache_salt: str | None = None,
    ) -> ContextInfo:
        """Compute the prompt's KV and keep its whole blocks pinned for `ttl_seconds` (or until deleted).

        Raises ContextLimitError when the engine's cap on pinned tokens would be exceeded, ValueError for a
        bad prompt or TTL."""
        if self._dead is not None:
            raise EngineDeadError("engine core is dead") from self._dead
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be > 0")
        if not prompt_token_ids:
            raise ValueError("the context must contain at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the context has {len(prompt_token_ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens and requests need room after it"
            )
        now = time.time()
        for stale in [cid for cid, expires_at in self._contexts.items() if expires_at <= now]:
            del self._contexts[stale]  # the engine unpinned it when it expired
        context_id = context_id or f"ctx-{uuid.uuid4().hex}"
        if context_id in self._contexts:
            raise ValueError(f"context id {context_id!r} is already in use")
        request_id = f"context-{context_id}"
        self._ensure_output_task()
        waiter: asyncio.Future[EngineCoreOutput] = asyncio.get_running_loop().create_future()
        self._context_waiters[request_id] = waiter
        try:
            self.client.add_request(
                EngineCoreRequest(
                    request_id=request_id,
                    prompt_token_ids=list(prompt_token_ids),
                    sampling_params=SamplingParams(temperature=0.0, max_tokens=1),
                    cache_salt=cache_salt or "",
                    create_context=CreateContext(context_id=context_id, ttl_seconds=ttl_seconds),
                )
            )
            out = await waiter
        except BaseException:
            if not waiter.done():
                self.client.abort([request_id])
            raise
        finally:
            self._context_waiters.pop(request_id, None)
        if out.error_type == "context_limit":
            raise ContextLimitError(str(out.stop_reason))
        if out.finish_reason == "abort" or out.context_pinned_tokens is None:
            raise ValueError(f"the engine did not pin the context: {out.stop_reason or 'aborted'}")
        expires_at = time.time() + ttl_seconds
        self._contexts[context_id] = expires_at
        return ContextInfo(
            context_id=context_id,
            num_tokens=len(prompt_token_ids),
            num_pinned_tokens=out.context_pinned_tokens,
            expires_at=expires_at,
        )

    async def delete_context(self, context_id: str) -> bool:
        """Unpin a context; False when this front end does not know it (another one made it: the engine is
        told all the same) or it had already expired."""
        expires_at = self._contexts.pop(context_id, None)
        if self.is_alive():
            self.client.send(ReleaseContext(context_id=context_id))
        return expires_at is not None and expires_at > time.time()

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached block no request or context uses, in both tiers."""
        if not self.is_alive():
            return False
        self.client.send(ResetPrefixCache())
        return True

    def start(self) -> None:
        """Begin consuming the core's outputs now rather than at the first request (needs a running loop):
        a routed core streams stats and cache events from the start."""
        self._ensure_output_task()

    def _ensure_output_task(self) -> None:
        if self._output_task is None or self._output_task.done():
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        try:
            while True:
                batch = await self.client.get_outputs()
                self._observe(batch)
                outputs = batch.outputs
                if self._context_waiters:
                    outputs = [o for o in outputs if not self._context_done(o)]
                touched, to_abort = self._processor.process(outputs)
                if to_abort:
                    self.client.abort(to_abort)
                for state in touched:
                    queue_ = self._queues.get(state.request_id)
                    if queue_ is not None:
                        queue_.put_nowait(state.snapshot())
        except Exception as exc:
            self._dead = exc
            for queue_ in self._queues.values():
                queue_.put_nowait(exc)
            for waiter in self._context_waiters.values():
                if not waiter.done():
                    waiter.set_exception(EngineDeadError("engine core failed"))

    def _context_done(self, out: EngineCoreOutput) -> bool:
        """Route a context-creating request's output to its waiter (it has no output stream)."""
        waiter = self._context_waiters.get(out.request_id)
        if waiter is None:
            return False
        if out.finish_reason is not None and not waiter.done():
            waiter.set_result(out)
        return True

    def _observe(self, batch: EngineCoreOutputs) -> None:
        if batch.stats is not None:
            self.metrics.record_stats(batch.stats)
        now = time.monotonic()
        for out in batch.outputs:
            if out.queue_time is not None:
                self.metrics.record_queue_time(out.queue_time)
            if not out.new_token_ids:
                continue
            entry = self._processor.children.get(out.request_id)
            timing = self._timings.get(entry[0].request_id) if entry is not None else None
            if timing is None:
                continue
            if timing.first_token is None:
                timing.first_token = now
                self.metrics.record_first_token(now - timing.arrival, len(entry[0].prompt_token_ids))
                itl = None
            else:
                itl = now - timing.last_token if timing.last_token is not None else None
            timing.last_token = now
            self.metrics.record_tokens(len(out.new_token_ids), itl)

    def is_alive(self) -> bool:
        return self._dead is None and self.client.is_alive()

    def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.client.shutdown()
        self.tokenizer_pool.close()


def _finish_reason(state: RequestState) -> str:
    reasons = [s.output.finish_reason for s in state.sequences.values()]
    if all(r is not None for r in reasons):
        return "length" if "length" in reasons else str(reasons[0])
    return "abort"


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """b is later than a: keep b's totals and prepend a's deltas."""
    for old, new in zip(a.outputs, b.outputs, strict=False):
        new.delta_text = old.delta_text + new.delta_text
        new.delta_token_ids = old.delta_token_ids + new.delta_token_ids
        new.delta_logprobs = old.delta_logprobs + new.delta_logprobs
    return b
