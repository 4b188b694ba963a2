"""A tiny OpenAI-compatible SSE server for the benchmark tests (plain asyncio, no model).

It streams one word per chunk with deterministic delays on its `clock` (first chunk after `ttft_s`, then
every `itl_s`), so measured latencies are checkable; it fakes a block-aligned prefix cache
(`cached_tokens`), a whitespace tokenizer behind `POST /tokenize`, and injects failures on chosen request
numbers. It listens on 127.0.0.1: `async with` serves it from the caller's event loop, `with` runs it on its
own thread and loop (for the CLI). `transport()` also serves it in-process, without sockets, to an
`httpx.AsyncClient` on the same loop: with a `LoopClock` on a `VirtualTimeLoop` (tests/bench/virtual_time.py)
the benchmark then measures exactly the delays the server sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from deepflow.bench.clock import SYSTEM_CLOCK, Clock

CHAT_OVERHEAD = 3  # template tokens the fake adds per chat message


def fake_token_ids(text: str) -> list[int]:
    """Whitespace 'tokenizer': one stable id per word."""
    return [100 + zlib.crc32(w.encode()) % 30000 for w in text.split()]


@dataclass
class Behavior:
    """What the fake does; request numbers count completion requests from 1, in arrival order."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    fail_every: int = 0  # every k-th request answers HTTP 500
    error_event_every: int = 0  # every k-th request sends an error event after one token
    hang_every: int = 0  # every k-th request never answers (client timeout)
    report_usage: bool = True
    report_cached: bool = True
    block_size: int = 16
    api_key: str | None = None
    tokenize: bool = True  # serve POST /tokenize


@dataclass
class FakeOpenAIServer:
    behavior: Behavior = field(default_factory=Behavior)
    port: int = 0
    clock: Clock = SYSTEM_CLOCK  # sleeps the delays, stamps the arrivals
    requests: list[dict[str, Any]] = field(default_factory=list)  # bodies, in arrival order
    arrivals: list[float] = field(default_factory=list)  # clock.now() at arrival
    in_flight: int = 0
    max_in_flight: int = 0
    tokenize_calls: int = 0

    def __post_init__(self) -> None:
        self._blocks: set[tuple[int, ...]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeOpenAIServer:
        """Serve from a thread with its own loop (for code that runs its own `asyncio.run`, like the CLI)."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self.__aexit__(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport that hands each request to this server in-process (same event loop)."""
        return _InProcessTransport(self)

    async def __aenter__(self) -> FakeOpenAIServer:
        """Serve from the caller's event loop (and, through `transport()`, in-process)."""
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- server plumbing -------------------------------------------------------------------------------

    def _run(self) -> None:
        self._loop = loop = asyncio.new_event_loop()
        loop.run_until_complete(self.__aenter__())
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            method, path, _ = line.decode().split(" ", 2)
            headers: dict[str, str] = {}
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                key, _, value = header.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            await self._dispatch(method, path, headers, body, _SocketReply(writer))

    # -- endpoints -------------------------------------------------------------------------------------

    async def _dispatch(
        self, method: str, path: str, headers: dict[str, str], raw: bytes, reply: _Reply
    ) -> None:
        b = self.behavior
        if b.api_key is not None and headers.get("authorization") != f"Bearer {b.api_key}":
            await reply.json(401, {"error": {"message": "bad api key"}})
            return
        body = json.loads(raw or b"{}")
        if method == "POST" and path == "/tokenize" and b.tokenize:
            self.tokenize_calls += 1
            await reply.json(200, {"tokens": fake_token_ids(body["prompt"])})
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._complete(path == "/v1/chat/completions", body, reply)
            finally:
                self.in_flight -= 1
        else:
            await reply.json(404, {"error": {"message": f"no route {path}"}})

    def _prompt_ids(self, chat: bool, body: dict[str, Any]) -> list[int]:
        if not chat:
            prompt = body["prompt"]
            return list(prompt) if isinstance(prompt, list) else fake_token_ids(prompt)
        ids: list[int] = []
        for message in body["messages"]:
            ids += [1] * CHAT_OVERHEAD + fake_token_ids(message["content"])
        return ids

    def _cached(self, ids: list[int]) -> int:
        """Longest block-aligned prefix seen before (at most len-1 tokens); then remember this prompt."""
        size = self.behavior.block_size
        cached = 0
        for end in range(size, len(ids), size):
            if tuple(ids[:end]) not in self._blocks:
                break
            cached = end
        for end in range(size, len(ids) + 1, size):
            self._blocks.add(tuple(ids[:end]))
        return cached

    async def _complete(self, chat: bool, body: dict[str, Any], reply: _Reply) -> None:
        b = self.behavior
        self.requests.append(body)
        self.arrivals.append(self.clock.now())
        number = len(self.requests)
        ids = self._prompt_ids(chat, body)
        cached = self._cached(ids)
        if b.fail_every and number % b.fail_every == 0:
            await reply.json(500, {"error": {"message": f"injected failure #{number}"}})
            return
        if b.hang_every and number % b.hang_every == 0:
            await self.clock.sleep(3600)
        await reply.start_stream()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str) -> dict[str, Any]:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return {"object": kind, "choices": [choice]}

        if chat:  # the role chunk carries no content: TTFT must not stop at it
            await reply.event({"object": kind, "choices": [{"index": 0, "delta": {"role": "a"}}]})
        n = int(body.get("max_tokens") or 16)
        for i in range(n):
            await self.clock.sleep(b.ttft_s if i == 0 else b.itl_s)
            await reply.event(chunk(f" w{i}"))
            if i == 0 and b.error_event_every and number % b.error_event_every == 0:
                await reply.event({"error": {"message": "injected stream error"}})
                break
        else:
            if b.report_usage:
                usage: dict[str, Any] = {
                    "prompt_tokens": len(ids),
                    "completion_tokens": n,
                    "total_tokens": len(ids) + n,
                }
                if b.report_cached:
                    usage["prompt_tokens_details"] = {"cached_tokens": cached}
                await reply.event({"object": kind, "choices": [], "usage": usage})
            await reply.event("[DONE]")
        await reply.end_stream()


# -- how an answer leaves: HTTP/1.1 on a socket, or chunks handed to an in-process httpx transport -------


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class _Reply(Protocol):
    async def json(self, status: int, obj: Any) -> None: ...
    async def start_stream(self) -> None: ...  # 200, text/event-stream
    async def event(self, obj: Any) -> None: ...  # one `data:` event (a str as is, else JSON)
    async def end_stream(self) -> None: ...


class _SocketReply:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        self.writer.write(head.encode() + data)
        await self.writer.drain()

    async def start_stream(self) -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

    async def event(self, obj: Any) -> None:
        payload = _sse(obj)
        self.writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


class _QueueReply:
    """Status and headers through a future, body bytes through a queue (None: the end); no I/O at all."""

    def __init__(self) -> None:
        self.head: asyncio.Future[tuple[int, dict[str, str]]] = asyncio.get_running_loop().create_future()
        self.body: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    async def json(self, status: int, obj: Any) -> None:
        self.head.set_result((status, {"content-type": "application/json"}))
        self.body.put_nowait(json.dumps(obj).encode())
        self.body.put_nowait(None)

    async def start_stream(self) -> None:
        self.head.set_result((200, {"content-type": "text/event-stream"}))

    async def event(self, obj: Any) -> None:
        self.body.put_nowait(_sse(obj))

    async def end_stream(self) -> None:
        self.body.put_nowait(None)

    def finish(self, error: Exception | None = None, cancelled: bool = False) -> None:
        """The handler returned, raised `error` or was cancelled: whoever waits on head or body wakes up."""
        if not self.head.done():
            if cancelled:
                self.head.cancel()
            else:
                self.head.set_exception(error or RuntimeError("the fake server sent no answer"))
        elif error is not None:
            self.body.put_nowait(error)
        self.body.put_nowait(None)


class _InProcessStream(httpx.AsyncByteStream):
    def __init__(self, reply: _QueueReply, task: asyncio.Task[None]) -> None:
        self.reply, self.task = reply, task

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (item := await self.reply.body.get()) is not None:
            if isinstance(item, BaseException):
                raise item  # a bug in the fake: fail loudly, not as a counted request error
            yield item

    async def aclose(self) -> None:
        self.task.cancel()  # the client hung up (done, error event, timeout): like a dropped connection


class _InProcessTransport(httpx.AsyncBaseTransport):
    def __init__(self, server: FakeOpenAIServer) -> None:
        self.server = server

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = {key.lower(): value for key, value in request.headers.items()}
        reply = _QueueReply()

        async def handle() -> None:
            try:
                await self.server._dispatch(request.method, request.url.path, headers, body, reply)
            except asyncio.CancelledError:
                reply.finish(cancelled=True)
                raise
            except Exception as exc:  # handed to the client, which raises it
                reply.finish(exc)
            else:
                reply.finish()

        task = asyncio.create_task(handle())
        try:
            status, response_headers = await reply.head
        except BaseException:
            task.cancel()  # e.g. the client's timeout while the server hangs before answering
            raise
        return httpx.Response(status, headers=response_headers, stream=_InProcessStream(reply, task))
