"""How the asyncio front end talks to an EngineCore: in a thread of this process, or in a process of its own.

Both clients run the same `run_core_loop`: drain commands (add / abort / shutdown), step while there is work,
send each step's outputs with the scheduler's gauges. The process client speaks msgspec messages over
ZeroMQ (PUSH/PULL on ipc sockets, as vLLM does), so a crash of the engine process is seen by the front end
(its requests fail with `EngineDeadError`) and never takes the HTTP server down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from deepflow.engine.config import EngineConfig
from deepflow.engine.contexts import ContextLimitError
from deepflow.engine.kv_transfer import KVPrefilled
from deepflow.engine.request import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core failed; requests in flight cannot complete."""


# ---- messages ------------------------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add"):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class ReleaseContext(msgspec.Struct, tag="release_context"):
    context_id: str


class ResetPrefixCache(msgspec.Struct, tag="reset_prefix_cache"):
    pass


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


Command = AddRequest | AbortRequests | ReleaseContext | ResetPrefixCache | KVPrefilled | Shutdown


class EngineCoreFailed(msgspec.Struct, tag="failed"):
    error: str


class EngineCoreReady(msgspec.Struct, tag="ready"):
    max_model_len: int
    eos_token_ids: list[int]
    model_path: str
    num_kv_blocks: int


# ---- the loop both clients run -------------------------------------------------------------------------
def run_core_loop(
    core: Any, next_command: Callable[[bool], Command | None], emit: Callable[[EngineCoreOutputs], None]
) -> None:
    """Serve an EngineCore until Shutdown. `next_command(block)` returns None when none is queued."""
    while True:
        outputs: list[EngineCoreOutput] = []
        handled = False
        block = not core.has_work()
        while (command := next_command(block)) is not None:
            if isinstance(command, Shutdown):
                return
            handled = True
            block = False
            if isinstance(command, AddRequest):
                try:
                    core.add_request(command.request)
                except ValueError as exc:  # validated at the edge; this is the last guard, never a crash
                    outputs.append(
                        EngineCoreOutput(
                            request_id=command.request.request_id,
                            new_token_ids=[],
                            finish_reason=FinishReason.ABORT,
                            stop_reason=str(exc),
                            error_type="context_limit" if isinstance(exc, ContextLimitError) else "invalid",
                        )
                    )
            elif isinstance(command, AbortRequests):
                outputs.extend(core.abort(command.request_ids))
            elif isinstance(command, KVPrefilled):
                outputs.extend(core.kv_prefilled(command))
            elif isinstance(command, ReleaseContext):
                core.release_context(command.context_id)
            elif isinstance(command, ResetPrefixCache):
                core.reset_prefix_cache()
        if core.has_work():
            outputs.extend(core.step())
        events = core.cache.take_events()
        if outputs or handled or events:
            emit(EngineCoreOutputs(outputs=outputs, stats=core.scheduler.step_stats(), kv_events=events))


class EngineCoreClient(Protocol):
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    model_path: Path

    def add_request(self, request: EngineCoreRequest) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def send(self, command: Command) -> None: ...
    async def get_outputs(self) -> EngineCoreOutputs: ...
    def is_alive(self) -> bool: ...
    def shutdown(self) -> None: ...


# ---- in-process: a thread ------------------------------------------------------------------------------
class InprocEngineCoreClient:
    """The core loop on a background thread of this process (tests, notebooks, `deepflow generate`)."""

    def __init__(self, config: EngineConfig) -> None:
        from deepflow.engine.core import EngineCore

        self.core = EngineCore(config)
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = self.core.eos_token_ids
        self.model_path = self.core.model_path
        self._commands: queue.Queue[Command] = queue.Queue()
        self._outputs: asyncio.Queue[EngineCoreOutputs | BaseException] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._dead: BaseException | None = None

    def _ensure_started(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._outputs = asyncio.Queue()
            self._thread.start()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._ensure_started()
        self._commands.put(AddRequest(request))

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(AbortRequests(request_ids))

    def send(self, command: Command) -> None:
        self._ensure_started()
        self._commands.put(command)

    async def get_outputs(self) -> EngineCoreOutputs:
        self._ensure_started()
        assert self._outputs is not None
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            raise EngineDeadError(f"engine core failed: {item!r}") from item
        return item

    def is_alive(self) -> bool:
        return self._dead is None

    def _emit(self, item: EngineCoreOutputs | BaseException) -> None:
        assert self._loop is not None and self._outputs is not None
        self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)

    def _next_command(self, block: bool) -> Command | None:
        try:
            return self._commands.get(block=block)
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            run_core_loop(self.core, self._next_command, self._emit)
        except BaseException as exc:  # surface to every waiting request instead of hanging them
            logger.exception("engine core loop died")
            self._dead = exc
            self._emit(exc)

    def shutdown(self) -> None:
        self._commands.put(Shutdown())
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.core.shutdown()


# ---- out of process: ZeroMQ ----------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_output_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs | EngineCoreFailed)


def _engine_process_main(config: EngineConfig, command_addr: str, output_addr: str, ready: Any) -> None:
    """Entry point of the engine process: build the core, say ready, serve commands until shutdown."""
    parent = os.getppid()
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(command_addr)
    outputs = context.socket(zmq.PUSH)
    outputs.connect(output_addr)
    try:
        from deepflow.engine.core import EngineCore

        core = EngineCore(config)
    except BaseException as exc:
        ready.send(EngineCoreFailed(error=f"{type(exc).__name__}: {exc}"))
        return
    ready.send(
        EngineCoreReady(
            max_model_len=core.max_model_len,
            eos_token_ids=list(core.eos_token_ids),
            model_path=str(core.model_path),
            num_kv_blocks=core.cache.num_blocks,
        )
    )

    def next_command(block: bool) -> Command | None:
        while True:
            if commands.poll(1000 if block else 0):
                return _command_decoder.decode(commands.recv())
            if not block:
                return None
            if os.getppid() != parent:  # orphaned: the front end is gone, so is every client
                return Shutdown()

    try:
        run_core_loop(core, next_command, lambda out: outputs.send(_encoder.encode(out)))
    except BaseException:
        outputs.send(_encoder.encode(EngineCoreFailed(error=traceback.format_exc())))
        raise
    finally:
        core.shutdown()
        context.destroy(linger=1000)


class MPEngineCoreClient:
    """The engine core in a process of its own; commands and outputs are msgspec messages over ZeroMQ."""

    def __init__(self, config: EngineConfig, startup_timeout: float = 300.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="deepflow-core-")
        command_addr = f"ipc://{self._tmp.name}/commands"
        output_addr = f"ipc://{self._tmp.name}/outputs"
        # Commands go out on a plain socket (usable with or without a running event loop, e.g. at
        # shutdown); outputs come in on an asyncio one.
        self._sync_context = zmq.Context()
        self._commands = self._sync_context.socket(zmq.PUSH)
        self._commands.bind(command_addr)
        self._context = zmq.asyncio.Context()
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.bind(output_addr)
        mp = multiprocessing.get_context("spawn")
        ready_parent, ready_child = mp.Pipe(duplex=False)
        self._process = mp.Process(
            target=_engine_process_main,
            args=(config, command_addr, output_addr, ready_child),
            name="deepflow-engine-core",
            daemon=True,
        )
        self._process.start()
        ready_child.close()
        if not ready_parent.poll(startup_timeout):
            self._process.kill()
            raise EngineDeadError(f"engine process did not start within {startup_timeout:.0f} s")
        try:
            message = ready_parent.recv()
        except EOFError:
            raise EngineDeadError(
                f"engine process exited during startup (code {self._process.exitcode})"
            ) from None
        if isinstance(message, EngineCoreFailed):
            self._process.join(timeout=5)
            raise EngineDeadError(f"engine process failed to start: {message.error}")
        self.max_model_len = message.max_model_len
        self.eos_token_ids = tuple(message.eos_token_ids)
        self.model_path = Path(message.model_path)
        self.num_kv_blocks = message.num_kv_blocks
        self._dead: str | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    def _send(self, command: Command) -> None:
        if not self.is_alive():
            raise EngineDeadError(self._dead or "engine process is not running")
        self._commands.send(_encoder.encode(command), flags=zmq.NOBLOCK)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(AddRequest(request))

    def abort(self, request_ids: list[str]) -> None:
        with contextlib.suppress(EngineDeadError, zmq.ZMQError):
            self._send(AbortRequests(request_ids))

    def send(self, command: Command) -> None:
        self._send(command)

    async def get_outputs(self) -> EngineCoreOutputs:
        while True:
            if await self._outputs.poll(timeout=500):
                message = _output_decoder.decode(await self._outputs.recv())
                if isinstance(message, EngineCoreFailed):
                    self._dead = message.error
                    raise EngineDeadError(f"engine core failed: {message.error}")
                return message
            if not self._process.is_alive():
                self._dead = f"engine process exited with code {self._process.exitcode}"
                raise EngineDeadError(self._dead)

    def shutdown(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self._commands.send(_encoder.encode(Shutdown()), flags=zmq.NOBLOCK)
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._context.destroy(linger=0)
        self._sync_context.destroy(linger=0)
        self._tmp.cleanup()
