"""Async engine: streams each request's output as it is produced and aborts it at any time.

The engine core runs its plain loop on a thread of its own (`ThreadedEngineCoreClient`); this asyncio side
tokenizes, detokenizes, checks stop strings and fans outputs out to per-request queues. The client is a
small interface so that the core can live in another process (ZeroMQ) without touching this file.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

from deepflow.engine.config import EngineConfig
from deepflow.engine.core import EngineCore
from deepflow.engine.outputs import OutputProcessor, RequestOutput, RequestState
from deepflow.engine.request import EngineCoreOutput, EngineCoreRequest, FinishReason
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core failed; requests in flight cannot complete."""


class EngineCoreClient(Protocol):
    max_model_len: int
    eos_token_ids: tuple[int, ...]

    def add_request(self, request: EngineCoreRequest) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    async def get_outputs(self) -> list[EngineCoreOutput]: ...
    def shutdown(self) -> None: ...


_SHUTDOWN = object()


class ThreadedEngineCoreClient:
    """Runs an EngineCore loop on a background thread; commands in through a queue, outputs to asyncio."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = self.core.eos_token_ids
        self.model_path = self.core.model_path
        self._commands: queue.Queue[Any] = queue.Queue()
        self._outputs: asyncio.Queue[list[EngineCoreOutput] | BaseException] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._started = False

    def _ensure_started(self) -> None:
        if not self._started:
            self._loop = asyncio.get_running_loop()
            self._outputs = asyncio.Queue()
            self._thread.start()
            self._started = True

    def add_request(self, request: EngineCoreRequest) -> None:
        self._ensure_started()
        self._commands.put(("add", request))

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    async def get_outputs(self) -> list[EngineCoreOutput]:
        self._ensure_started()
        assert self._outputs is not None
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            raise EngineDeadError(f"engine core failed: {item!r}") from item
        return item

    def shutdown(self) -> None:
        self._commands.put(_SHUTDOWN)
        if self._started:
            self._thread.join(timeout=30)
        self.core.shutdown()

    def _emit(self, item: list[EngineCoreOutput] | BaseException) -> None:
        assert self._loop is not None and self._outputs is not None
        self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)

    def _handle(self, command: Any) -> list[EngineCoreOutput]:
        kind, payload = command
        if kind == "add":
            try:
                self.core.add_request(payload)
            except ValueError as exc:  # validated at the edge; this is the last guard, never a crash
                logger.warning("rejected request %s: %s", payload.request_id, exc)
                return [
                    EngineCoreOutput(
                        request_id=payload.request_id,
                        new_token_ids=[],
                        finish_reason=FinishReason.ABORT,
                        stop_reason=str(exc),
                    )
                ]
            return []
        return self.core.abort(payload)

    def _run(self) -> None:
        try:
            while True:
                outputs: list[EngineCoreOutput] = []
                block = not self.core.has_work()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    if command is _SHUTDOWN:
                        return
                    outputs.extend(self._handle(command))
                    block = False
                if self.core.has_work():
                    outputs.extend(self.core.step())
                if outputs:
                    self._emit(outputs)
        except BaseException as exc:  # surface to every waiting request instead of hanging them
            logger.exception("engine core loop died")
            self._emit(exc)


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, client: EngineCoreClient | None = None) -> None:
        self.config = config or EngineConfig()
        self.client: EngineCoreClient = client or ThreadedEngineCoreClient(self.config)
        self.model_path = getattr(self.client, "model_path", None) or self.config.model_path()
        self.tokenizer = Tokenizer(self.model_path)
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.client.eos_token_ids))
        self.max_model_len = self.client.max_model_len
        self._processor = OutputProcessor()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._states: dict[str, RequestState] = {}
        self._output_task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._dead: BaseException | None = None

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput each time the request advances; the last has `finished` set.

        Closing the iterator early (client gone) aborts the request in the engine.
        """
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
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = outputs
        self._states[request_id] = state
        self._processor.add(state)
        finished = False
        try:
            for child_id, seq in state.sequences.items():
                self.client.add_request(
                    EngineCoreRequest(
                        request_id=child_id,
                        prompt_token_ids=ids,
                        sampling_params=seq.params,
                        eos_token_ids=self.eos_token_ids,
                        priority=priority,
                    )
                )
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError("engine core failed") from item
                # Coalesce what piled up while the consumer was busy.
                while not item.finished and not outputs.empty():
                    nxt = outputs.get_nowait()
                    if isinstance(nxt, BaseException):
                        raise EngineDeadError("engine core failed") from nxt
                    item = _merge(item, nxt)
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._states.pop(request_id, None)
            live = self._processor.remove(state)
            if live and self._dead is None:
                self.client.abort(live)

    async def abort(self, request_id: str) -> None:
        """Stop a request: its stream ends with finish_reason "abort" and its KV blocks are freed."""
        state = self._states.get(request_id)
        if state is not None:
            live = [cid for cid, seq in state.sequences.items() if not seq.output.finished]
            self.client.abort(live)

    def _ensure_output_task(self) -> None:
        if self._output_task is None or self._output_task.done():
            self._output_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        try:
            while True:
                outputs = await self.client.get_outputs()
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

    def shutdown(self) -> None:
        if self._output_task is not None:
            self._output_task.cancel()
        self.client.shutdown()


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """b is later than a: keep b's totals and prepend a's deltas."""
    for old, new in zip(a.outputs, b.outputs, strict=False):
        new.delta_text = old.delta_text + new.delta_text
        new.delta_token_ids = old.delta_token_ids + new.delta_token_ids
        new.delta_logprobs = old.delta_logprobs + new.delta_logprobs
    return b
