"""POST /v1/chat/completions: the model's chat template, then one engine request with `n` sequences."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

import jinja2
from fastapi.responses import Response
from starlette.requests import Request

from deepflow.api.errors import invalid
from deepflow.api.limits import OFFLOAD_BYTES
from deepflow.api.logprobs import chat_logprobs
from deepflow.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Usage,
)
from deepflow.api.state import EngineStream, ServedModels, ServerState, finish_reason, new_id, usage_numbers
from deepflow.api.streaming import (
    EngineStreamingResponse,
    merge,
    respond_when_done,
    sse,
    sse_stream,
    submit_refused,
)
from deepflow.engine.outputs import RequestOutput
from deepflow.engine.tokenizer import TokenizerError

logger = logging.getLogger(__name__)


async def encode_chat(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
) -> list[int]:
    """Template text, then tokens; by default no added specials: the template writes BOS where wanted."""
    rendered = [m.for_template() for m in messages]
    try:
        if sum(len(m["content"]) for m in rendered) > OFFLOAD_BYTES:  # a long chat: off the event loop
            text = await asyncio.to_thread(
                state.tokenizer.apply_chat_template, rendered, add_generation_prompt=add_generation_prompt
            )
        else:
            text = state.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt)
    except (TokenizerError, jinja2.TemplateError, ValueError, TypeError) as exc:
        raise invalid(f"Could not apply the chat template: {exc}", param="messages") from exc
    return await state.encode(text, add_special_tokens=add_special_tokens)


async def create_chat_completion(
    models: ServedModels, body: ChatCompletionRequest, request: Request
) -> Response:
    body.check_supported()
    state = models.get(body.model)
    state.check_sequences(1, body.n or 1)
    context, cache_salt = state.contexts.resolve(body.context_id, body.cache_salt, state.served_model_name)
    if context is None:
        prompt_ids = await encode_chat(state, body.messages)
    elif context.messages is not None:
        # One conversation, rendered whole: the template places the context's turns (its system prompt
        # above all) where it wants them; the engine reuses whatever prefix still matches the context.
        prompt_ids = await encode_chat(state, [*context.messages, *body.messages])
    else:
        prompt_ids = context.token_ids + await encode_chat(state, body.messages)
    max_tokens = body.max_new_tokens()
    state.check_context(len(prompt_ids), max_tokens, "messages", body.min_tokens or 0)
    params = body.sampling_params(max_tokens, body.num_logprobs())
    state.check_alive()
    request_id = new_id("chatcmpl")
    try:
        stream = state.engine.submit(
            prompt_ids,
            params,
            request_id,
            priority=body.priority or 0,
            cache_salt=cache_salt,
            context_id=context.id if context is not None else None,
            restartable=not body.streaming,  # nothing is shown before the end: a TE failure can start over
        )
    except Exception as exc:
        return submit_refused(request_id, exc, streaming=body.streaming)
    run = _ChatRun(state, body, request_id, params.n)
    if body.streaming:
        return EngineStreamingResponse(sse_stream(request_id, run.stream(stream)), [stream])
    return await respond_when_done(request, request_id, [stream], run.collect(stream), run.response)


class _ChatRun:
    def __init__(self, state: ServerState, body: ChatCompletionRequest, request_id: str, n: int) -> None:
        self.state = state
        self.body = body
        self.request_id = request_id
        self.n = n
        self.wants_logprobs = bool(body.logprobs)
        self.created = int(time.time())

    @staticmethod
    async def collect(stream: EngineStream) -> RequestOutput:
        final: RequestOutput | None = None
        merged = merge([stream])
        try:
            async for _, output in merged:
                final = output
        finally:
            await merged.aclose()
        assert final is not None, "the engine stream ended without output"
        return final

    def response(self, final: RequestOutput) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=seq.index,
                message=AssistantMessage(content=seq.text),
                logprobs=chat_logprobs(self.state.decoder, seq.logprobs or [])
                if self.wants_logprobs
                else None,
                finish_reason=finish_reason(seq),
                stop_reason=seq.stop_reason,
            )
            for seq in final.outputs
        ]
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.served_model_name,
            choices=choices,
            usage=Usage.of(*usage_numbers([final])),
        )

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.state.served_model_name,
            choices=choices,
            usage=usage,
        )

    async def stream(self, stream: EngineStream) -> AsyncGenerator[bytes, None]:
        exclude = None if self.body.include_usage else {"usage"}
        final: RequestOutput | None = None
        done: set[int] = set()
        merged = merge([stream])
        try:
            for index in range(self.n):
                role = ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})
                yield sse(self._chunk([role]), exclude)
            async for _, output in merged:
                final = output
                for seq in output.outputs:
                    has_logprobs = self.wants_logprobs and bool(seq.delta_logprobs)
                    if seq.index in done or not (seq.delta_text or seq.finished or has_logprobs):
                        continue
                    if seq.finished:
                        done.add(seq.index)
                    choice = ChatChunkChoice(
                        index=seq.index,
                        delta={"content": seq.delta_text} if seq.delta_text else {},
                        logprobs=chat_logprobs(self.state.decoder, seq.delta_logprobs)
                        if has_logprobs
                        else None,
                        finish_reason=finish_reason(seq),
                        stop_reason=seq.stop_reason,
                    )
                    yield sse(self._chunk([choice]), exclude)
            if self.body.include_usage and final is not None:
                yield sse(self._chunk([], Usage.of(*usage_numbers([final]))))
        finally:
            await merged.aclose()
