"""POST /v1/completions: one engine request per prompt (the engine fans each out to `n` sequences)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable

from fastapi.responses import Response
from starlette.requests import Request

from deepflow.api.logprobs import CompletionLogprobsBuilder
from deepflow.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from deepflow.api.state import EngineStream, ServedModels, ServerState, finish_reason, new_id, usage_numbers
from deepflow.api.streaming import (
    EngineStreamingResponse,
    merge,
    respond_when_done,
    sse,
    sse_stream,
    submit_all,
    submit_refused,
)
from deepflow.engine.outputs import RequestOutput
from deepflow.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class _Prompt:
    __slots__ = ("ids", "text")

    def __init__(self, text: str, ids: list[int]) -> None:
        self.text = text
        self.ids = ids


async def _prepare_prompts(state: ServerState, body: CompletionRequest, prefix: list[int]) -> list[_Prompt]:
    """Each prompt's engine tokens: `prefix` (a context's tokens) then the prompt's own; echo shows only the
    prompt's own text, the part the client sent."""
    prompts = body.prompts()
    out = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            # After a context the text continues a sequence: no second BOS in the middle of it.
            ids = await state.encode(prompt, add_special_tokens=not prefix)
            out.append(_Prompt(prompt, prefix + ids))
        else:
            state.check_token_ids(prompt, param)
            # Echo shows what the model saw, special tokens included.
            out.append(_Prompt(await state.decode(prompt), prefix + prompt))
        state.check_context(len(out[-1].ids), body.max_new_tokens(), param)
    return out


async def create_completion(models: ServedModels, body: CompletionRequest, request: Request) -> Response:
    body.check_supported()
    state = models.get(body.model)
    state.check_sequences(len(body.prompts()), body.n or 1)
    context, cache_salt = state.contexts.resolve(body.context_id, body.cache_salt, state.served_model_name)
    prompts = await _prepare_prompts(state, body, context.token_ids if context is not None else [])
    params = body.sampling_params(body.max_new_tokens(), body.logprobs)
    state.check_alive()
    request_id = new_id("cmpl")

    def submission(i: int, prompt: _Prompt) -> Callable[[], EngineStream]:
        return lambda: state.engine.submit(
            prompt.ids,
            params,
            request_id if len(prompts) == 1 else f"{request_id}#p{i}",  # one job: the response id
            priority=body.priority or 0,
            cache_salt=cache_salt,
            context_id=context.id if context is not None else None,
            restartable=not body.streaming,  # nothing is shown before the end: a TE failure can start over
        )

    try:
        streams = submit_all(submission(i, p) for i, p in enumerate(prompts))
    except Exception as exc:
        return submit_refused(request_id, exc, streaming=body.streaming)
    run = _Run(state, body, params, request_id, prompts)
    if body.streaming:
        return EngineStreamingResponse(sse_stream(request_id, run.stream(streams)), streams)
    return await respond_when_done(request, request_id, streams, run.collect(streams), run.response)


class _Run:
    """One completion request's response assembly, shared by the streaming and non-streaming paths."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        params: SamplingParams,
        request_id: str,
        prompts: list[_Prompt],
    ) -> None:
        self.state = state
        self.body = body
        self.params = params
        self.request_id = request_id
        self.prompts = prompts
        self.n = params.n
        self.echo = bool(body.echo)
        self.created = int(time.time())

    def _logprobs_builder(self) -> CompletionLogprobsBuilder:
        # echo + logprobs is refused (no prompt logprobs), so offsets always start at the completion.
        return CompletionLogprobsBuilder(self.state.decoder, 0, self.params.skip_special_tokens)

    def _envelope(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.served_model_name,
            choices=choices,
            usage=usage,
        )

    @staticmethod
    async def collect(streams: list[EngineStream]) -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        merged = merge(streams)
        try:
            async for index, output in merged:
                finals[index] = output
        finally:
            await merged.aclose()
        return [finals[i] for i in range(len(streams))]

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for i, output in enumerate(finals):
            for seq in output.outputs:
                logprobs = None
                if self.body.logprobs is not None:
                    logprobs = self._logprobs_builder().build(seq.logprobs or [])
                choices.append(
                    CompletionChoice(
                        index=i * self.n + seq.index,
                        text=(self.prompts[i].text if self.echo else "") + seq.text,
                        logprobs=logprobs,
                        finish_reason=finish_reason(seq),
                        stop_reason=seq.stop_reason,
                    )
                )
        choices.sort(key=lambda c: c.index)
        return self._envelope(choices, Usage.of(*usage_numbers(finals)))

    async def stream(self, streams: list[EngineStream]) -> AsyncGenerator[bytes, None]:
        exclude = None if self.body.include_usage else {"usage"}
        finals: dict[int, RequestOutput] = {}
        done: set[int] = set()
        builders = {i: self._logprobs_builder() for i in range(len(self.prompts) * self.n)}
        merged = merge(streams)
        try:
            if self.echo:
                for i, prompt in enumerate(self.prompts):
                    for j in range(self.n):
                        choice = CompletionChoice(index=i * self.n + j, text=prompt.text)
                        yield sse(self._envelope([choice]), exclude)
            async for i, output in merged:
                finals[i] = output
                for seq in output.outputs:
                    index = i * self.n + seq.index
                    wants_logprobs = self.body.logprobs is not None
                    if index in done or not (
                        seq.delta_text or seq.finished or (wants_logprobs and seq.delta_logprobs)
                    ):
                        continue
                    if seq.finished:
                        done.add(index)
                    choice = CompletionChoice(
                        index=index,
                        text=seq.delta_text,
                        logprobs=builders[index].build(seq.delta_logprobs) if wants_logprobs else None,
                        finish_reason=finish_reason(seq),
                        stop_reason=seq.stop_reason,
                    )
                    yield sse(self._envelope([choice]), exclude)
            if self.body.include_usage:
                usage = Usage.of(*usage_numbers([finals[i] for i in range(len(self.prompts))]))
                yield sse(self._envelope([], usage))
        finally:
            await merged.aclose()
