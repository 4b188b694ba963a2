"""One streamed OpenAI-compatible request, timed chunk by chunk (SSE parsed by hand over httpx).

The OpenAI SDK hides chunk arrival times behind its own buffering and retries, so the client reads the raw
`text/event-stream` lines itself. A request never raises: whatever goes wrong (HTTP status, an error event,
a timeout, a dropped connection) ends up in its `RequestRecord` so that failures are counted, not lost.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from deepflow.bench.clock import SYSTEM_CLOCK, Clock
from deepflow.bench.datasets import Prompt

__all__ = [
    "RequestRecord",
    "chat_payload",
    "completions_payload",
    "iter_sse_data",
    "stream_request",
]


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start_s` counts from the start of the measured run."""

    index: int
    session: int
    turn: int
    prompt_len: int  # tokens we built (chat: without the template's tokens)
    start_s: float | None = None  # None: never sent
    success: bool = False
    error: str | None = None
    error_kind: str | None = None  # short, groupable: "HTTP 500", "timeout", "stream error", ...
    status: int | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    content_chunks: int = 0
    text: str = field(default="", repr=False)  # the answer (multi-turn feeds it back); not exported

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.success or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def fail(self, kind: str, detail: str | None = None) -> None:
        self.success = False
        self.error_kind = kind
        self.error = kind if detail is None else f"{kind}: {detail}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, times in milliseconds (the generated text is left out)."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 3)

        return {
            "index": self.index,
            "session": self.session,
            "turn": self.turn,
            "prompt_len": self.prompt_len,
            "start_ms": ms(self.start_s),
            "success": self.success,
            "error": self.error,
            "error_kind": self.error_kind,
            "status": self.status,
            "ttft_ms": ms(self.ttft_s),
            "tpot_ms": ms(self.tpot_s),
            "e2e_ms": ms(self.e2e_s),
            "itl_ms": [ms(x) for x in self.itl_s],
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "content_chunks": self.content_chunks,
        }


def _sampling(max_tokens: int, temperature: float, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM/deepflow extension: exactly max_tokens tokens per request
    return body


def completions_payload(
    model: str, prompt: Prompt, max_tokens: int, temperature: float = 0.0, ignore_eos: bool = True
) -> dict[str, Any]:
    """`/v1/completions` body; a list of ints is sent as token ids (exact length, any tokenizer)."""
    return {"model": model, "prompt": prompt, **_sampling(max_tokens, temperature, ignore_eos)}


def chat_payload(
    model: str,
    messages: Sequence[dict[str, str]],
    max_tokens: int,
    temperature: float = 0.0,
    ignore_eos: bool = True,
) -> dict[str, Any]:
    """`/v1/chat/completions` body."""
    return {"model": model, "messages": list(messages), **_sampling(max_tokens, temperature, ignore_eos)}


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each server-sent event; multi-line data is joined with newlines, comments skipped."""
    event = "message"
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


def _chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text of a chunk: completions `text`, chat `delta.content` (or a reasoning delta)."""
    pieces = []
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    pieces.append(delta[key])
    return "".join(pieces)


def _error_message(chunk: dict[str, Any]) -> str | None:
    """An error event's message: `{"error": {...}}` (OpenAI, vLLM) or `{"object": "error", ...}`."""
    if chunk.get("object") == "error":
        return str(chunk.get("message", chunk))
    error = chunk.get("error")
    if error:
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    return None


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    payload: dict[str, Any],
    record: RequestRecord,
    timeout: float,
    clock: Clock = SYSTEM_CLOCK,
) -> RequestRecord:
    """POST `payload` to `path`, streaming, and fill `record`; `timeout` bounds the whole request.

    Latencies are differences of `clock.now()`; the timeout runs on the event loop's clock.
    """
    start = clock.now()
    last: float | None = None
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    done = False
    try:
        async with asyncio.timeout(timeout), client.stream("POST", path, json=payload) as response:
            record.status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.fail(f"HTTP {response.status_code}", body[:300])
                return record
            async for event, data in iter_sse_data(response.aiter_lines()):
                if data.strip() == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"SSE data is not a JSON object: {data[:100]!r}")
                message = _error_message(chunk)
                if message is not None or event == "error":
                    record.fail("stream error", message or data[:300])
                    return record
                text = _chunk_text(chunk)
                if text:
                    now = clock.now()
                    if last is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last = now
                    pieces.append(text)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
    except TimeoutError:
        record.fail("timeout", f"no complete answer within {timeout:g} s")
        return record
    except httpx.TimeoutException as exc:
        record.fail("timeout", f"{type(exc).__name__} (limit {timeout:g} s)")
        return record
    except httpx.HTTPError as exc:
        record.fail(type(exc).__name__, str(exc) or None)
        return record
    except ValueError as exc:  # json.JSONDecodeError included
        record.fail("bad stream", str(exc))
        return record
    record.e2e_s = clock.now() - start
    record.text = "".join(pieces)
    record.content_chunks = len(pieces)
    record.output_tokens = len(pieces)
    if usage is not None:
        record.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        completion_tokens = _int_or_none(usage.get("completion_tokens"))
        if completion_tokens is not None:
            record.output_tokens = completion_tokens
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            record.cached_tokens = _int_or_none(details.get("cached_tokens"))
    if not done:
        record.fail("truncated stream", "the stream ended before data: [DONE]")
        return record
    record.success = True
    return record


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
