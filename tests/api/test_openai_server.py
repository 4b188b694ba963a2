"""The OpenAI-compatible server end to end: a real `deepflow serve` process driven by the official client.

Generation is kept short (a few tokens each) so the module stays well under a minute and a half on 2 cores.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

import deepflow
from tests.api.server_utils import AUTH, ServerProcess, get_metrics, metric_value, wait_for

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def greedy(client: OpenAI, server: ServerProcess) -> Any:
    """The greedy answer to QUESTION, requested once with a caller-chosen request id."""
    raw = client.chat.completions.with_raw_response.create(
        model=server.model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        extra_headers={"x-request-id": "my-request-1"},
    )
    assert raw.headers["x-request-id"] == "my-request-1"
    return raw.parse()


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in {"invalid_request_error", "server_error", "service_unavailable_error"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- models, chat, completions -------------------------------------------------------------------------
def test_models(client: OpenAI, server: ServerProcess) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model] == ["SmolLM2-135M-Instruct"]
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "deepflow"
    assert (card.model_extra or {})["max_model_len"] > 0
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_non_streaming(greedy: Any, server: ServerProcess) -> None:
    assert greedy.id.startswith("chatcmpl-") and greedy.object == "chat.completion"
    assert greedy.model == server.model and greedy.created > 0
    (choice,) = greedy.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and choice.logprobs is None
    usage = greedy.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Present and an int; > 0 once the engine's prefix cache serves repeated prompts.
    details = usage.prompt_tokens_details
    assert details is not None and isinstance(details.cached_tokens, int)
    assert 0 <= details.cached_tokens <= usage.prompt_tokens


def test_chat_streaming_matches_and_reports_usage(client: OpenAI, greedy: Any, server: ServerProcess) -> None:
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.index == 0
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == greedy.usage.completion_tokens
    assert last.usage.prompt_tokens == greedy.usage.prompt_tokens
    details = last.usage.prompt_tokens_details
    assert details is not None and 0 <= details.cached_tokens <= last.usage.prompt_tokens  # type: ignore[operator]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_length_stream_and_request_id(
    client: OpenAI, http: httpx.Client, server: ServerProcess
) -> None:
    args: dict[str, Any] = dict(
        model=server.model,
        prompt="Once upon a time",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    resp = client.completions.create(**args)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    (choice,) = resp.choices
    assert choice.finish_reason == "length" and choice.text
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.usage.prompt_tokens_details is not None
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    assert all(c.usage is None for c in chunks)
    # Without a caller-chosen id the server assigns one.
    assigned = http.post("/v1/completions", json={**_plain(args), "max_tokens": 1})
    assert assigned.status_code == 200 and len(assigned.headers["x-request-id"]) >= 16


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in args.items() if k != "extra_body"}
    return {**body, **args.get("extra_body", {})}


def test_n2_completions_and_streamed_chat(client: OpenAI, server: ServerProcess) -> None:
    resp = client.completions.create(
        model=server.model, prompt="Hello", n=2, max_tokens=3, temperature=1, seed=3
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage is not None and resp.usage.prompt_tokens == len(_tokens(server, "Hello"))
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,  # type: ignore[arg-type]
            n=2,
            max_tokens=3,
            temperature=1,
            seed=3,
            stream=True,
        )
    )
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1] and sorted(finished) == [0, 1]


def _tokens(server: ServerProcess, prompt: str) -> list[int]:
    return httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}, headers=AUTH).json()["tokens"]


def test_stop_string(client: OpenAI, greedy: Any, server: ServerProcess) -> None:
    base = greedy.choices[0].message.content
    resp = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        stop=["Paris"],
    )
    assert resp.choices[0].message.content == base[: base.index("Paris")]
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.choices[0].model_extra or {}).get("stop_reason") == "Paris"


def test_seed_is_reproducible(client: OpenAI, server: ServerProcess) -> None:
    args: dict[str, Any] = dict(
        model=server.model, prompt="Write a word:", max_tokens=6, temperature=1, seed=1234
    )
    first = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args).choices[0].text == first


def test_completion_logprobs(client: OpenAI, server: ServerProcess) -> None:
    args: dict[str, Any] = dict(
        model=server.model,
        prompt="The sky is",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = client.completions.create(**args).choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert "".join(lp.tokens) == choice.text
    offsets, at = [], 0
    for token in lp.tokens:
        offsets.append(at)
        at += len(token)
    assert lp.text_offset == offsets
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 2 <= len(top) <= 3 and top[token] == logprob
        assert max(top.values()) == logprob  # greedy: the chosen token is the most likely one
    streamed = list(client.completions.create(**args, stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    stream_offsets = [
        o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset or []
    ]
    assert tokens == lp.tokens and stream_offsets == lp.text_offset


def test_chat_logprobs(client: OpenAI, server: ServerProcess) -> None:
    resp = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content).startswith(choice.message.content or "")
    for item in content:
        assert item.logprob <= 0 and bytes(item.bytes or []).decode() == item.token
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob


def test_echo_batch_and_token_prompts(client: OpenAI, server: ServerProcess) -> None:
    resp = client.completions.create(
        model=server.model, prompt="The sky is", echo=True, max_tokens=2, temperature=0
    )
    assert resp.choices[0].text.startswith("The sky is") and len(resp.choices[0].text) > len("The sky is")
    chunks = list(
        client.completions.create(
            model=server.model, prompt="The sky is", echo=True, max_tokens=2, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].text == "The sky is"
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    ids = _tokens(server, "The sky is")
    hello = _tokens(server, "Hello")
    batch = client.completions.create(model=server.model, prompt=[hello, ids], max_tokens=2, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    assert batch.usage is not None and batch.usage.prompt_tokens == len(hello) + len(ids)
    by_index = {c.index: c.text for c in batch.choices}
    assert "The sky is" + by_index[1] == resp.choices[0].text  # token-id prompt == the same text prompt
    strings = client.completions.create(model=server.model, prompt=["Hello", "Hi"], max_tokens=1, n=2)
    assert sorted(c.index for c in strings.choices) == [0, 1, 2, 3]  # prompt i, sample j -> index i * n + j


# ---- errors ----------------------------------------------------------------------------------------------
CHAT = {"model": "SmolLM2-135M-Instruct", "messages": QUESTION, "max_tokens": 2}
COMPLETION = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

BAD_REQUESTS: list[tuple[str, dict[str, Any], str | None, str | None]] = [
    # (path, body, expected param, expected code)
    ("/v1/chat/completions", {**CHAT, "foo": 1}, "foo", None),
    ("/v1/completions", {**COMPLETION, "max_token": 5}, "max_token", None),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p", None),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens", None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs", None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", None),
    ("/v1/chat/completions", {**CHAT, "stop": ["", "x"]}, "stop", None),
    ("/v1/chat/completions", {**CHAT, "min_tokens": 5}, "min_tokens", None),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options", None),
    ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "messages"}, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", None),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role",
        None,
    ),
    ("/v1/completions", {**COMPLETION, "logprobs": 6}, "logprobs", None),
    ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt", None),
    ("/v1/completions", {**COMPLETION, "best_of": 1, "n": 2}, "best_of", None),
    # Known OpenAI parameters DeepFlow cannot honour: refused by name, never ignored.
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL]}, "tools", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "functions": [TOOL["function"]]}, "functions", "unsupported_parameter"),
    (
        "/v1/chat/completions",
        {**CHAT, "parallel_tool_calls": True},
        "parallel_tool_calls",
        "unsupported_parameter",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_object"}},
        "response_format",
        "unsupported_parameter",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
        "unsupported_parameter",
    ),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"42": -100}}, "logit_bias", "unsupported_parameter"),
    (
        "/v1/chat/completions",
        {**CHAT, "audio": {"voice": "alloy", "format": "wav"}},
        "audio",
        "unsupported_parameter",
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "modalities": ["text", "audio"]},
        "modalities",
        "unsupported_parameter",
    ),
    ("/v1/chat/completions", {**CHAT, "store": True}, "store", "unsupported_parameter"),
    (
        "/v1/chat/completions",
        {**CHAT, "reasoning_effort": "high"},
        "reasoning_effort",
        "unsupported_parameter",
    ),
    (
        "/v1/chat/completions",
        {
            **CHAT,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        },
        "messages[0].content",
        None,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
        "messages[0].role",
        None,
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
        "messages[0].tool_calls",
        "unsupported_parameter",
    ),
    ("/v1/completions", {**COMPLETION, "suffix": "end"}, "suffix", "unsupported_parameter"),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of", "unsupported_parameter"),
    ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}, "logprobs", "unsupported_parameter"),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD_REQUESTS)
def test_bad_requests_are_400(
    http: httpx.Client, path: str, body: dict, param: str | None, code: str | None
) -> None:
    assert_error(http.post(path, json=body), 400, param, code)


def test_neutral_values_of_unsupported_parameters_are_accepted(http: httpx.Client) -> None:
    body = {
        **CHAT,
        "max_tokens": 1,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
        "modalities": ["text"],
        "user": "alice",
        "n": 1,
        "stream": False,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert http.post("/v1/completions", json={**COMPLETION, "max_tokens": 1, "best_of": 1}).status_code == 200


def test_malformed_json_and_non_object_bodies(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/chat/completions", content=b'{"model": ', headers=AUTH), 400)
    assert "JSON" in error["message"] and error["type"] == "invalid_request_error"
    assert_error(http.post("/v1/completions", content=b"[1, 2]"), 400)
    assert_error(http.post("/v1/completions", content=b""), 400)


def test_context_length_is_checked_with_numbers(
    http: httpx.Client, client: OpenAI, server: ServerProcess
) -> None:
    max_len = (client.models.list().data[0].model_extra or {})["max_model_len"]
    error = assert_error(
        http.post("/v1/completions", json={**COMPLETION, "max_tokens": max_len + 100}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert str(max_len) in error["message"] and str(max_len + 100) in error["message"]
    long_chat = {
        **CHAT,
        "max_tokens": None,
        "messages": [{"role": "user", "content": "hello " * (max_len + 10)}],
    }
    error = assert_error(
        http.post("/v1/chat/completions", json=long_chat), 400, "messages", "context_length_exceeded"
    )
    assert str(max_len) in error["message"]


def test_unknown_model_is_404(http: httpx.Client, client: OpenAI) -> None:
    assert_error(
        http.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"}), 404, "model", "model_not_found"
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)  # type: ignore[arg-type]


def test_sdk_raises_bad_request_naming_the_parameter(client: OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,  # type: ignore[arg-type]
            tools=[TOOL],  # type: ignore[list-item]
        )
    assert info.value.code == "unsupported_parameter" and info.value.param == "tools"


def test_auth(server: ServerProcess) -> None:
    error = assert_error(httpx.get(f"{server.url}/v1/models"), 401, code="invalid_api_key")
    assert error["type"] == "invalid_request_error"
    wrong = {"Authorization": "Bearer nope"}
    assert_error(
        httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=wrong),
        401,
        code="invalid_api_key",
    )
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH).status_code == 200
    # Every route but /health needs the key: tokenizing costs CPU, metrics tell of other tenants' traffic.
    assert httpx.get(f"{server.url}/health").status_code == 200
    for method, path, body in (
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [1]}),
        ("GET", "/metrics", None),
        ("GET", "/version", None),
        ("GET", "/openapi.json", None),
    ):
        response = httpx.request(method, f"{server.url}{path}", json=body)
        assert_error(response, 401, code="invalid_api_key")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


# ---- tokenizer, health, version, metrics ---------------------------------------------------------------
def test_tokenize_and_detokenize(http: httpx.Client, greedy: Any) -> None:
    out = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] > 0
    assert http.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"model": "SmolLM2-135M-Instruct", "messages": QUESTION}).json()
    assert chat["count"] == greedy.usage.prompt_tokens
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/tokenize", json={"prompt": "a", "messages": QUESTION}), 400)
    assert_error(
        http.post("/tokenize", json={"prompt": "a", "model": "nope"}), 404, "model", "model_not_found"
    )
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_health_and_version(server: ServerProcess) -> None:
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    version = httpx.get(f"{server.url}/version", headers=AUTH)
    assert version.json() == {"version": deepflow.__version__}


def test_metrics(server: ServerProcess, greedy: Any) -> None:
    response = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:generation_tokens_total",
        "http_requests_total",
    ):
        assert metric_value(text, name) is not None, name
    assert metric_value(text, "http_requests_total", handler="/v1/chat/completions", status="200")


# ---- client disconnects ----------------------------------------------------------------------------------
def _engine_idle_after_abort(url: str, aborts_before: float) -> bool:
    text = get_metrics(url)
    return (
        metric_value(text, "vllm:kv_cache_usage_perc") == 0.0
        and metric_value(text, "vllm:num_requests_running") == 0.0
        and (metric_value(text, "vllm:request_success_total", finished_reason="abort") or 0.0) > aborts_before
    )


def _aborts(url: str) -> float:
    return metric_value(get_metrics(url), "vllm:request_success_total", finished_reason="abort") or 0.0


LONG_CHAT = {**CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000}


def test_disconnect_mid_stream_aborts_and_frees_kv(server: ServerProcess) -> None:
    before = _aborts(server.url)
    body = {**LONG_CHAT, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        content_chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                content_chunks += 1
            if content_chunks >= 2:
                break
        assert metric_value(get_metrics(server.url), "vllm:kv_cache_usage_perc") > 0  # type: ignore[operator]
    # Leaving the block closed the connection mid-stream: the engine must drop the request and its blocks.
    assert wait_for(lambda: _engine_idle_after_abort(server.url, before), timeout=30), get_metrics(server.url)
    after = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=AUTH, timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None


def test_disconnect_while_waiting_non_streaming_aborts(server: ServerProcess) -> None:
    before = _aborts(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={**LONG_CHAT, "ignore_eos": True},
            headers=AUTH,
            timeout=httpx.Timeout(60, read=3),
        )
    assert wait_for(lambda: _engine_idle_after_abort(server.url, before), timeout=30), get_metrics(server.url)
    assert (
        httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=AUTH, timeout=60).status_code
        == 200
    )
