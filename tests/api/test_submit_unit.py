"""Submitting before the response starts, against a fake engine (no model): the `x-deepflow-te` header on
every kind of response, submit refusals answered as before, and no submitted stream left unreleased."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect
from starlette.types import Message

from deepflow.api.server import build_app
from deepflow.api.streaming import TE_HEADER, EngineStreamingResponse
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 5}
COMPLETION = {"model": MODEL, "prompt": "Paris is", "max_tokens": 5}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(build_app(engine, MODEL), raise_server_exceptions=False)


def sse_events(text: str) -> list[Any]:
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", text
    return [json.loads(d) for d in data[:-1]]


def streamed(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "stream": True}


# ---- x-deepflow-te ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", streamed(CHAT)),
        ("/v1/completions", COMPLETION),
        ("/v1/completions", streamed(COMPLETION)),
    ],
    ids=["chat", "chat-stream", "completions", "completions-stream"],
)
def test_te_header_names_the_te(client: TestClient, engine: FakeEngine, path: str, body: dict) -> None:
    engine.te_ids = ["te-0"]
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.headers[TE_HEADER] == "te-0"
    if body.get("stream"):
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(
            e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content") or ""
            for e in sse_events(response.text)
        )
        assert text == " Paris."
    else:
        assert response.json()["id"] == engine.calls[-1].request_id
    assert engine.open_streams == []


@pytest.mark.parametrize("stream", [False, True])
def test_te_header_joins_the_distinct_tes_of_a_batch(
    client: TestClient, engine: FakeEngine, stream: bool
) -> None:
    engine.route = lambda index: [f"te-{index % 2}"]  # prompts 0, 1, 2 -> te-0, te-1, te-0
    body = {**COMPLETION, "prompt": ["a", "b", "c"], "stream": stream}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers[TE_HEADER] == "te-0,te-1"
    assert len(engine.streams) == 3 and engine.open_streams == []


def test_te_header_keeps_the_order_of_a_stream_over_several_tes(
    client: TestClient, engine: FakeEngine
) -> None:
    engine.te_ids = ["te-3", "te-1"]  # n=2: the children went to two TEs
    response = client.post("/v1/chat/completions", json={**CHAT, "n": 2})
    assert response.status_code == 200 and response.headers[TE_HEADER] == "te-3,te-1"


def test_no_te_no_header(client: TestClient, engine: FakeEngine) -> None:
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", streamed(COMPLETION))):
        response = client.post(path, json=body)
        assert response.status_code == 200 and TE_HEADER not in response.headers


def test_errors_carry_no_te_header(client: TestClient, engine: FakeEngine) -> None:
    engine.te_ids = ["te-0"]
    engine.mode = "abort"  # submitted to te-0, then aborted by the engine: an error, not a success
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 500 and TE_HEADER not in response.headers
    engine.mode = "dead"
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503 and TE_HEADER not in response.headers
    assert engine.open_streams == []


# ---- refusals at submit time -----------------------------------------------------------------------------
def test_refused_prompt_releases_the_batch_submitted_before_it(
    client: TestClient, engine: FakeEngine
) -> None:
    engine.refuse_call = 1
    response = client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b", "c"]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "refuses submit 1" in error["message"]
    assert len(engine.calls) == 2  # the third prompt was never submitted
    (first,) = engine.streams
    assert first.released and first.request_id.endswith("#p0")  # the job id is the response id


def test_refused_prompt_in_a_stream_is_a_400_not_an_event(client: TestClient, engine: FakeEngine) -> None:
    """The stream has not started when submit refuses: the client's mistake gets its status, never a 200."""
    engine.refuse_call = 2
    engine.te_ids = ["te-0"]
    response = client.post("/v1/completions", json=streamed({**COMPLETION, "prompt": ["a", "b", "c"]}))
    assert response.status_code == 400 and TE_HEADER not in response.headers
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "refuses submit 2" in error["message"]
    assert len(engine.streams) == 2 and engine.open_streams == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_dead_engine_at_submit_is_503_or_an_error_event(
    client: TestClient, engine: FakeEngine, path: str
) -> None:
    engine.mode = "dead"
    body = CHAT if path == "/v1/chat/completions" else COMPLETION
    error = client.post(path, json=body).json()["error"]
    assert error["code"] == "engine_dead" and "exited with code -9" in error["message"]
    (event,) = sse_events(client.post(path, json=streamed(body)).text)
    assert event["error"]["code"] == "engine_dead"


def test_unexpected_submit_failure_is_500(client: TestClient, engine: FakeEngine) -> None:
    engine.mode = "boom"
    response = client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 500 and "kaboom" in response.json()["error"]["message"]
    (event,) = sse_events(client.post("/v1/completions", json=streamed(COMPLETION)).text)
    assert event["error"]["type"] == "server_error" and "kaboom" in event["error"]["message"]


# ---- release however the response ends ---------------------------------------------------------------------
def test_stream_is_released_when_the_client_leaves_before_the_first_byte(engine: FakeEngine) -> None:
    """The body generator never starts (so its `finally` never runs): the response itself releases."""
    streams = [engine.submit([1, 2, 3], request_id="cmpl-x-0"), engine.submit([4], request_id="cmpl-x-1")]
    started: list[bool] = []

    async def body() -> AsyncGenerator[bytes, None]:
        started.append(True)
        yield b"data: never\n\n"

    async def receive() -> Message:
        return {"type": "http.disconnect"}  # the client is already gone

    async def send(message: Message) -> None:
        await asyncio.sleep(3600)  # the status line never goes out

    response = EngineStreamingResponse(body(), streams)
    scope = {"type": "http", "asgi": {"spec_version": "2.0"}}
    asyncio.run(asyncio.wait_for(response(scope, receive, send), timeout=10))
    assert started == [] and engine.open_streams == []


def test_stream_is_released_when_sending_fails(engine: FakeEngine) -> None:
    stream = engine.submit([1, 2, 3], request_id="cmpl-y")

    async def receive() -> Message:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        raise OSError("connection reset")

    async def body() -> AsyncGenerator[bytes, None]:
        async for _ in stream:
            yield b"data: x\n\n"

    response = EngineStreamingResponse(body(), [stream])
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        asyncio.run(response(scope, receive, send))
    assert stream.released
