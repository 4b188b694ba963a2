"""The app against a fake engine (no model): parameter mapping, engine failures, metrics without an engine
registry, and the CLI's size parser. Fast; what a real engine cannot be made to do on demand lives here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deepflow.api.cli import parse_size, resolve_api_key
from deepflow.api.server import build_app
from deepflow.cli import build_parser
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine

MODEL = "fake-model"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(build_app(engine, MODEL, api_key=None), raise_server_exceptions=False)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], **extra}


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_every_sampling_parameter_reaches_the_engine(client: TestClient, engine: FakeEngine) -> None:
    body = chat(
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=11,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        repetition_penalty=1.1,
        max_completion_tokens=7,
        max_tokens=99,
        min_tokens=2,
        stop="END",
        stop_token_ids=[5],
        ignore_eos=True,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        logprobs=True,
        top_logprobs=3,
        priority=-1,
        user="someone",
    )
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(engine.calls) == 1  # n=2 is one engine request; the engine fans it out
    call = engine.calls[-1]
    prompt, params, request_id, priority = call.prompt, call.params, call.request_id, call.priority
    assert params == SamplingParams(
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=11,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        repetition_penalty=1.1,
        max_tokens=7,  # max_completion_tokens wins over the deprecated max_tokens
        min_tokens=2,
        stop=["END"],
        stop_token_ids=[5],
        ignore_eos=True,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        logprobs=3,
    )
    assert priority == -1 and request_id is not None and request_id.startswith("chatcmpl-")
    template = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Capital of France?"}])
    assert prompt == engine.tokenizer.encode(template, add_special_tokens=False)
    out = response.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert out["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] == -0.5


def test_defaults_match_openai(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}).status_code == 200
    params = engine.calls[-1].params
    assert params == SamplingParams(max_tokens=16)  # completions: 16 tokens, temperature 1
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert engine.calls[-1].params == SamplingParams(max_tokens=None)  # chat: up to the context


def test_content_parts_and_developer_role(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Capital"}, {"type": "text", "text": "of France?"}],
        },
    ]
    assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).status_code == 200
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital\nof France?"}]
    )
    assert engine.calls[-1].prompt == engine.tokenizer.encode(expected, add_special_tokens=False)


def test_engine_dead_is_503(client: TestClient, engine: FakeEngine) -> None:
    engine.mode = "dead"
    error = error_of(client.post("/v1/chat/completions", json=chat()), 503)
    assert error["code"] == "engine_dead" and "exited" in error["message"]
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "stream": True})
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["code"] == "engine_dead" and events[-1] == "[DONE]"
    engine.alive = False
    assert error_of(client.get("/health"), 503)["code"] == "engine_dead"
    assert error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 503)


def test_unexpected_errors_are_500_with_request_id(client: TestClient, engine: FakeEngine) -> None:
    engine.mode = "boom"
    response = client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "abc"})
    error = error_of(response, 500)
    assert error["type"] == "server_error" and "kaboom" in error["message"]
    assert response.headers["x-request-id"] == "abc"


def test_engine_side_abort_is_an_error_not_a_finish_reason(client: TestClient, engine: FakeEngine) -> None:
    engine.mode = "abort"
    assert error_of(client.post("/v1/chat/completions", json=chat()), 500)["type"] == "server_error"


def test_metrics_without_engine_registry(client: TestClient) -> None:
    client.get("/health")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert 'http_requests_total{handler="/health",method="GET",status="200"} 1.0' in response.text


def test_validation_errors_are_400_never_422(client: TestClient) -> None:
    for body in (chat(n="2"), chat(stop=5), chat(stream_options={"include_usage": "yes"}, stream=True)):
        error = error_of(client.post("/v1/chat/completions", json=body), 400)
        assert error["param"] in {"n", "stop", "stream_options.include_usage"}, error


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("1.5G", 3 << 29), ("500MB", 500 * 10**6), ("4096", 4096)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1XB", "0", "-5MiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_serve_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--kv-cache-memory", "512MiB", "--port", "0"])
    assert args.kv_cache_memory == 512 << 20 and args.port == 0 and args.host == "127.0.0.1"
    assert args.dtype == "bfloat16" and args.served_model_name is None and not args.no_async_scheduling
    monkeypatch.delenv("DEEPFLOW_API_KEY", raising=False)
    assert resolve_api_key(args) is None
    monkeypatch.setenv("DEEPFLOW_API_KEY", "from-env")
    assert resolve_api_key(args) == "from-env"
    assert resolve_api_key(build_parser().parse_args(["serve", "--api-key", "flag"])) == "flag"
