"""Server-sent events and the plumbing that ties a request's lifetime to its HTTP connection.

Whatever ends a response early (client gone, error, server shutdown), every engine stream must be closed:
closing an `AsyncLLM.generate` iterator aborts the request in the engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import Request

from deepflow.api.errors import APIError, engine_dead, internal_error, invalid
from deepflow.engine.async_llm import EngineDeadError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_END = object()


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def sse(payload: BaseModel, exclude: set[str] | None = None) -> bytes:
    return b"data: " + payload.model_dump_json(exclude=exclude).encode() + b"\n\n"


def sse_error(error: APIError) -> bytes:
    """Errors after the 200 went out travel as an event, the way OpenAI's streams report them."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # already running elsewhere: its task's cancel closes it
            await aclose()


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
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

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
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
    request: Request, request_id: str, work: Awaitable[T], build: Callable[[T], BaseModel]
) -> Response:
    """The non-streaming answer: await the engine, map its failures to OpenAI errors, serialize the body."""
    try:
        result = await unless_disconnected(request, work)
    except ClientDisconnected:
        logger.info("%s: client disconnected, request aborted", request_id)
        return Response(status_code=499)
    except EngineDeadError as exc:
        raise engine_dead(exc) from exc
    except ValueError as exc:
        raise invalid(str(exc)) from exc
    return JSONResponse(build(result).model_dump(mode="json"))


async def sse_stream(request_id: str, events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """A streamed response: once the first event is out the status is sent, so any later failure becomes an
    error event; the stream always ends with `data: [DONE]`, and closing it closes `events` (aborting)."""
    try:
        async for event in events:
            yield event
    except APIError as err:
        yield sse_error(err)
    except EngineDeadError as exc:
        yield sse_error(engine_dead(exc))
    except ValueError as exc:
        yield sse_error(invalid(str(exc)))
    except Exception as exc:
        logger.exception("%s: stream failed", request_id)
        yield sse_error(internal_error(exc))
    finally:
        await events.aclose()
    yield DONE
