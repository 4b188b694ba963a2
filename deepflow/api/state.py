"""What the HTTP layer needs from engines and platform, and the checks every generation endpoint shares.

The server codes against the `EngineClient` and `PlatformView` protocols, not `AsyncLLM`'s or the job
executor's internals, so the engine core can sit in another process (or be faked in tests) without touching
this package.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from deepflow.api.errors import APIError, engine_dead, invalid, model_not_found
from deepflow.api.limits import OFFLOAD_BYTES, APILimits
from deepflow.api.logprobs import TokenDecoder
from deepflow.engine.contexts import ContextInfo
from deepflow.engine.outputs import CompletionOutput, RequestOutput
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # contexts.py imports the endpoint modules, which import this one
    from deepflow.api.contexts import ContextRegistry


class EngineStream(Protocol):
    """One submitted request's outputs (`AsyncLLM.RequestStream`): read to the end, or released/closed early,
    which aborts it."""

    te_ids: list[str]  # the TEs serving it; empty when the engine's core does not route

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def release(self) -> None: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    tokenizer: Tokenizer
    max_model_len: int
    model_path: Path

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
    ) -> EngineStream: ...

    def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        context_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def create_context(
        self,
        prompt_token_ids: list[int],
        *,
        ttl_seconds: float,
        context_id: str | None = None,
        cache_salt: str | None = None,
    ) -> ContextInfo: ...

    async def delete_context(self, context_id: str) -> bool: ...

    async def reset_prefix_cache(self) -> bool: ...


class PlatformView(Protocol):
    """What the admin routes read from the job executor: job records and the cluster's state."""

    def job(self, job_id: str) -> dict[str, Any] | None: ...

    async def cluster(self) -> dict[str, Any]: ...

    async def scale(self, model: str, tes: int, role: str = "colocated") -> dict[str, Any]:
        """Run `tes` TEs in `model`'s `role` group; ValueError when refused. Returns the cluster's state."""
        ...


def engine_alive(engine: Any) -> bool:
    """`is_alive()` where the engine has it; an engine without it is taken to be alive."""
    check = getattr(engine, "is_alive", None)
    return bool(check()) if callable(check) else True


@dataclass
class ServerState:
    engine: EngineClient
    served_model_name: str
    contexts: ContextRegistry
    api_key: str | None = None
    limits: APILimits = field(default_factory=APILimits)
    created: int = field(default_factory=lambda: int(time.time()))
    decoder: TokenDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = TokenDecoder(self.engine.tokenizer)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, in the engine's tokenizer pool when it has one; without one, a long text is
        encoded in a thread: either way the event loop keeps answering other connections meanwhile."""
        pool = getattr(self.engine, "tokenizer_pool", None)
        if pool is not None:
            return await pool.encode(text, add_special_tokens=add_special_tokens)
        if len(text) > OFFLOAD_BYTES:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def decode(self, ids: list[int]) -> str:
        """Text of `ids` with special tokens shown; many ids are decoded in a thread (as `encode`)."""
        if len(ids) > OFFLOAD_BYTES // 8:
            return await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise model_not_found(model)

    def check_alive(self) -> None:
        if not engine_alive(self.engine):
            raise engine_dead(model=self.served_model_name)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Out-of-vocabulary ids would index past the embedding table inside the engine."""
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    def check_sequences(self, prompts: int, n: int) -> None:
        """Work per request is bounded: every prompt is answered with `n` sequences."""
        cap = self.limits.max_sequences
        if prompts * n > cap:
            raise invalid(
                f"This request asks for {prompts * n} sequences ({prompts} prompt(s) x n={n}); this server "
                f"allows at most {cap} per request.",
                param="n",
            )

    def check_context(self, prompt_len: int, max_tokens: int | None, param: str, min_tokens: int = 0) -> None:
        """OpenAI's context_length_exceeded, with the numbers, before anything reaches the engine. Without
        `max_tokens` the completion may run to the context's end, so `min_tokens` must fit there."""
        limit = self.max_model_len
        what = "messages" if param == "messages" else "prompt"
        if prompt_len == 0:
            raise invalid(f"The {what} is empty (0 tokens).", param=param)
        if max_tokens is None:
            if min_tokens > 0 and prompt_len + min_tokens > limit:
                raise invalid(
                    f"This model's maximum context length is {limit} tokens. However, you requested at least "
                    f"{prompt_len + min_tokens} tokens ({prompt_len} in the {what}, min_tokens={min_tokens} "
                    f"in the completion). Please reduce the length of the {what} or min_tokens.",
                    param="min_tokens",
                    code="context_length_exceeded",
                )
            if prompt_len >= limit:
                raise invalid(
                    f"This model's maximum context length is {limit} tokens. However, your {what} resulted "
                    f"in {prompt_len} tokens, which leaves no room for the completion. Please reduce the "
                    f"length of the {what}.",
                    param=param,
                    code="context_length_exceeded",
                )
            return
        if prompt_len + max_tokens > limit:
            raise invalid(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                param=param,
                code="context_length_exceeded",
            )


class ServedModels:
    """The app's models by served name (order kept; the first answers bodies without `model`), sharing one
    context registry so that a context named with the wrong model is refused rather than unknown."""

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        contexts: ContextRegistry,
        api_key: str | None = None,
        limits: APILimits | None = None,
    ) -> None:
        if not engines:
            raise ValueError("an app serves at least one model")
        self.contexts = contexts
        self.limits = limits or APILimits()
        self.states = {
            name: ServerState(
                engine=engine, served_model_name=name, contexts=contexts, api_key=api_key, limits=self.limits
            )
            for name, engine in engines.items()
        }
        self.default = next(iter(self.states.values()))

    def __iter__(self) -> Iterator[ServerState]:
        return iter(self.states.values())

    def get(self, model: str | None) -> ServerState:
        """The state of `model` (the default when None), or OpenAI's 404 model_not_found."""
        if model is None:
            return self.default
        state = self.states.get(model)
        if state is None:
            raise model_not_found(model)
        return state

    @property
    def engines(self) -> dict[str, EngineClient]:
        return {name: state.engine for name, state in self.states.items()}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(seq: CompletionOutput) -> str | None:
    """OpenAI's reasons are stop/length; an engine-side abort is a failure of the request, not a reason."""
    if seq.finish_reason == "abort":
        detail = f": {seq.stop_reason}" if seq.stop_reason else ""
        raise APIError(f"The engine aborted the request{detail}", status_code=500, type="server_error")
    return seq.finish_reason


def usage_numbers(outputs: list[RequestOutput]) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens over a batch of prompts; each prompt counts once for n > 1."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(s.token_ids) for o in outputs for s in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return prompt, completion, cached
