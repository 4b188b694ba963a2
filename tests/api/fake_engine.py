"""An engine without a model for the app's unit tests: it records what reaches it and answers " Paris."."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from deepflow.engine.async_llm import EngineDeadError
from deepflow.engine.contexts import ContextInfo, ContextLimitError
from deepflow.engine.outputs import CompletionOutput, RequestOutput
from deepflow.engine.request import Logprobs
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer


@dataclass
class Call:
    prompt: list[int]
    params: SamplingParams
    request_id: str | None
    priority: int
    cache_salt: str | None
    context_id: str | None


@dataclass
class ContextCall:
    prompt_token_ids: list[int]
    ttl_seconds: float
    context_id: str | None
    cache_salt: str | None


class FakeStream:
    """A submitted request, like `AsyncLLM`'s RequestStream: yields its one output, then releases itself;
    `release`/`aclose` end it early. `released` is what leak checks read."""

    def __init__(self, request_id: str, output: RequestOutput, te_ids: list[str]) -> None:
        self.request_id = request_id
        self.te_ids = te_ids
        self.released = False
        self._pending: list[RequestOutput] = [output]

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.released or not self._pending:
            raise StopAsyncIteration
        output = self._pending.pop(0)
        if not self._pending:
            self.release()  # read to the end: released, as the real stream does
        return output

    def release(self) -> None:
        self.released = True

    async def aclose(self) -> None:
        self.release()


class FakeEngine:
    """Answers every request with the tokens of " Paris." (or fails, per `mode`), recording what it got.

    Modes: "ok", "dead" (EngineDeadError), "boom" (RuntimeError), "abort" (an engine-side abort),
    "limit" (create_context hits the pinned-token cap), "bad" (create_context refuses the input).
    `te_ids` names the TEs every stream reports (`route`, given a submit's index in `calls`, overrides it
    per stream); `refuse_call` makes the submit that would be `calls[i]` raise ValueError (a prompt refused
    mid-batch)."""

    def __init__(self, tokenizer: Tokenizer, model_path: str = "/models/fake-model") -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 64
        self.model_path = Path(model_path)
        self.mode = "ok"
        self.alive = True
        self.cached_tokens = 3
        self.te_ids: list[str] = []
        self.route: Callable[[int], list[str]] | None = None
        self.refuse_call: int | None = None
        self.clock: Callable[[], float] = time.time
        self.calls: list[Call] = []
        self.streams: list[FakeStream] = []
        self.context_calls: list[ContextCall] = []
        self.pinned: set[str] = set()
        self.deleted: list[str] = []
        self.resets = 0

    @property
    def open_streams(self) -> list[FakeStream]:
        """Submitted and never released: a leak once the response is over."""
        return [s for s in self.streams if not s.released]

    def is_alive(self) -> bool:
        return self.alive

    async def abort(self, request_id: str) -> None:
        pass

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
    ) -> FakeStream:
        params = sampling_params or SamplingParams()
        assert isinstance(prompt, list)
        index = len(self.calls)
        self.calls.append(Call(prompt, params, request_id, priority, cache_salt, context_id))
        if self.mode == "dead":
            raise EngineDeadError("engine process exited with code -9")
        if self.mode == "boom":
            raise RuntimeError("kaboom")
        if index == self.refuse_call:
            raise ValueError(f"the engine refuses submit {index}")
        ids = self.tokenizer.encode(" Paris.", add_special_tokens=False)
        lps = [Logprobs(i, -0.5, 1, [i], [-0.5]) for i in ids] if params.logprobs is not None else None
        reason = "abort" if self.mode == "abort" else "stop"
        outputs = [
            CompletionOutput(
                index=k,
                text=" Paris.",
                token_ids=ids,
                logprobs=lps,
                finish_reason=reason,
                delta_text=" Paris.",
                delta_token_ids=ids,
                delta_logprobs=lps or [],
            )
            for k in range(params.n)
        ]
        output = RequestOutput(request_id or "r", None, prompt, outputs, num_cached_tokens=self.cached_tokens)
        te_ids = self.route(index) if self.route is not None else list(self.te_ids)
        stream = FakeStream(request_id or "r", output, te_ids)
        self.streams.append(stream)
        return stream

    async def create_context(
        self,
        prompt_token_ids: list[int],
        *,
        ttl_seconds: float,
        context_id: str | None = None,
        cache_salt: str | None = None,
    ) -> ContextInfo:
        self.context_calls.append(ContextCall(list(prompt_token_ids), ttl_seconds, context_id, cache_salt))
        if self.mode == "dead":
            raise EngineDeadError("engine process exited with code -9")
        if self.mode == "limit":
            raise ContextLimitError(
                f"pinning {len(prompt_token_ids)} tokens would exceed the cap of 32 pinned context tokens; "
                "the cap is --max-context-tokens"
            )
        if self.mode == "bad":
            raise ValueError("the engine refuses this context")
        context_id = context_id or "ctx-from-engine"
        self.pinned.add(context_id)
        n = len(prompt_token_ids)
        return ContextInfo(
            context_id=context_id,
            num_tokens=n,
            num_pinned_tokens=n // 16 * 16,
            expires_at=self.clock() + ttl_seconds,
        )

    async def delete_context(self, context_id: str) -> bool:
        self.deleted.append(context_id)
        known = context_id in self.pinned
        self.pinned.discard(context_id)
        return known

    async def reset_prefix_cache(self) -> bool:
        if self.mode == "dead":
            raise EngineDeadError("engine process exited with code -9")
        self.resets += 1
        return True
