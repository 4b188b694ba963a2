"""Server-sent events and the plumbing that ties a request's lifetime to its HTTP connection.

Requests are submitted to the engine before the response starts (so the TE serving them is known for the
`x-deepflow-te` header). From then on, whatever ends a response early (client gone, error, server shutdown),
every submitted stream must be released: that aborts the request in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from deepflow.api.errors import APIError, engine_dead, internal_error, invalid
from deepflow.api.state import EngineStream
from deepflow.engine.async_llm import EngineDeadError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"
TE_HEADER = "x-deepflow-te"
_END = object()


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def sse(payload: BaseModel, exclude: set[str] | None = None) -> bytes:
    return b"data: " + payload.model_dump_json(exclude=exclude).encode() + b"\n\n"


def sse_error(error: APIError) -> bytes:
    """Errors after the 200 went out travel as an event, the way OpenAI's streams report them."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def engine_error(exc: BaseException) -> APIError | None:
    """The OpenAI error an engine failure is answered with; None for anything else (a bug: a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return engine_dead(exc)
    if isinstance(exc, ValueError):  # the engine refused the prompt or the parameters
        return invalid(str(exc))
    return None


# ---- submitting -----------------------------------------------------------------------------------------
def release_all(streams: Iterable[EngineStream]) -> None:
    for stream in streams:
        stream.release()


def submit_all(submissions: Iterable[Callable[[], EngineStream]]) -> list[EngineStream]:
    """Submit one request after another; when one is refused, those already submitted (a batch's earlier
    prompts) are released before the error propagates, so nothing keeps running for a failed request."""
    streams: list[EngineStream] = []
    try:
        for submit in submissions:
            streams.append(submit())
    except BaseException:
        release_all(streams)
        raise
    return streams


def te_headers(streams: Iterable[EngineStream]) -> dict[str, str]:
    """`x-deepflow-te`: the distinct TEs serving the request's streams, in order, comma-separated; none
    named, no header. A disaggregated sequence names its prefill TE, then its decode TE ("te-p0,te-d0":
    the routing client's `te_of`), so the header of a request lists both."""
    te_ids = dict.fromkeys(
        te_id for stream in streams for named in stream.te_ids for te_id in named.split(",") if te_id
    )
    return {TE_HEADER: ",".join(te_ids)} if te_ids else {}


def submit_refused(request_id: str, exc: Exception, *, streaming: bool) -> Response:
    """The answer to a request the engine refused at submit time. The client's mistakes (4xx) are answered
    with their status even for a stream, which has not started: a 200 would tell the client it was valid.
    Server-side failures are shaped as when they surfaced only after the response had started: an OpenAI
    error, or for a stream an error event then `[DONE]`."""
    error = engine_error(exc)
    if error is not None and error.status_code < 500:
        raise error from exc
    if not streaming:
        if error is None:
            raise exc  # a bug: the app's handlers log it and answer 500
        raise error from exc
    if error is None:
        logger.error("%s: submit failed", request_id, exc_info=exc)
        error = internal_error(exc)
    return StreamingResponse(iter((sse_error(error), DONE)), media_type=SSE_MEDIA_TYPE)


class EngineStreamingResponse(StreamingResponse):
    """An SSE response over submitted streams that releases them however the response ends. Closing the body
    generator is not enough: a client gone before the first byte cancels the response before the generator
    ever starts, and an unstarted generator runs no `finally`."""

    def __init__(self, content: AsyncGenerator[bytes, None], streams: Sequence[EngineStream]) -> None:
        super().__init__(content, media_type=SSE_MEDIA_TYPE, headers=te_headers(streams))
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            release_all(self.streams)  # idempotent: streams read to the end were released already


async def _close(stream: AsyncIterable[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # already running elsewhere: its task's cancel closes it
            await aclose()


async def merge(streams: Sequence[AsyncIterable[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as items arrive, tagged with the stream's index.

    One stream is passed through. On exit of any kind every stream is closed (its request aborted).
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await _close(streams[0])
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterable[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
            queue.put_nowait((index, _END))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await _close(stream)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a task stuck inside the engine iterator: cancelling it closes that iterator
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    """After the body is read, the next ASGI message is `http.disconnect`, sent when the client leaves."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects first."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def respond_when_done(
    request: Request,
    request_id: str,
    streams: Sequence[EngineStream],
    work: Awaitable[T],
    build: Callable[[T], BaseModel],
) -> Response:
    """The non-streaming answer: await `work` (which reads `streams`), map engine failures to OpenAI errors,
    serialize the body. The streams are released in the end even if `work` never got to run."""
    try:
        result = await unless_disconnected(request, work)
    except ClientDisconnected:
        logger.info("%s: client disconnected, request aborted", request_id)
        return Response(status_code=499)
    except EngineDeadError as exc:
        raise engine_dead(exc) from exc
    except ValueError as exc:
        raise invalid(str(exc)) from exc
    finally:
        release_all(streams)
    return JSONResponse(build(result).model_dump(mode="json"), headers=te_headers(streams))


async def sse_stream(request_id: str, events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """A streamed response: once the first event is out the status is sent, so any later failure becomes an
    error event; the stream always ends with `data: [DONE]`, and closing it closes `events` (aborting)."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        error = engine_error(exc)
        if error is None:
            logger.exception("%s: stream failed", request_id)
            error = internal_error(exc)
        yield sse_error(error)
    finally:
        await events.aclose()
    yield DONE
