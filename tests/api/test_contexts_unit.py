"""Context caching and prefix-cache admin against a fake engine (no model): every status code, the prompt that
reaches the engine for each kind of context, salts, expiry on an injected clock, auth, and the serve flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deepflow.api.contexts import Context
from deepflow.api.errors import APIError
from deepflow.api.protocol import MAX_CONTEXT_TTL, ChatMessage
from deepflow.api.server import build_app
from deepflow.cli import build_parser
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine

MODEL = "fake-model"
SYSTEM = [{"role": "system", "content": "You answer in one word."}]
QUESTION = [{"role": "user", "content": "Capital of France?"}]
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(tokenizer: Tokenizer, clock: Clock) -> FakeEngine:
    fake = FakeEngine(tokenizer)
    fake.clock = clock
    fake.max_model_len = 256
    return fake


def make_client(engine: FakeEngine, clock: Clock, api_key: str | None = None) -> TestClient:
    app = build_app(engine, MODEL, api_key=api_key)
    app.state.server.contexts.clock = clock
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(engine: FakeEngine, clock: Clock) -> TestClient:
    return make_client(engine, clock)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def template_ids(tokenizer: Tokenizer, messages: list[dict[str, str]], generation: bool = True) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation)
    return tokenizer.encode(text, add_special_tokens=False)


def create(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/contexts", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


# ---- create / retrieve / delete --------------------------------------------------------------------------
def test_create_from_messages_then_retrieve(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, messages=SYSTEM)
    expected = template_ids(engine.tokenizer, SYSTEM, generation=False)  # requests add the assistant header
    assert ctx == {
        "id": ctx["id"],
        "object": "context",
        "model": MODEL,
        "tokens": len(expected),
        "created": int(T0),
        "expires_at": int(T0 + 3600),  # the default TTL
    }
    assert ctx["id"].startswith("ctx-")
    (call,) = engine.context_calls
    assert call.prompt_token_ids == expected and call.ttl_seconds == 3600
    assert call.context_id == ctx["id"] and call.cache_salt is None
    assert client.get(f"/v1/contexts/{ctx['id']}").json() == ctx


def test_create_from_prompt_text_and_token_ids(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, prompt="A long document.", ttl_seconds=60, cache_salt="tenant-a")
    call = engine.context_calls[-1]
    assert call.prompt_token_ids == engine.tokenizer.encode("A long document.")
    assert call.ttl_seconds == 60 and call.cache_salt == "tenant-a"
    assert ctx["expires_at"] == int(T0 + 60)
    ctx = create(client, prompt=[1, 2, 3], ttl_seconds=0.5)
    assert ctx["tokens"] == 3 and engine.context_calls[-1].prompt_token_ids == [1, 2, 3]


def test_delete(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, messages=SYSTEM)
    response = client.delete(f"/v1/contexts/{ctx['id']}")
    assert response.status_code == 200
    assert response.json() == {"id": ctx["id"], "object": "context.deleted", "deleted": True}
    assert engine.deleted == [ctx["id"]]
    assert error_of(client.get(f"/v1/contexts/{ctx['id']}"), 404)["code"] == "context_not_found"
    assert error_of(client.delete(f"/v1/contexts/{ctx['id']}"), 404)["code"] == "context_not_found"
    assert engine.deleted == [ctx["id"]]  # the engine is told once


def test_unknown_context_is_404_everywhere(client: TestClient) -> None:
    for response in (
        client.get("/v1/contexts/ctx-nope"),
        client.delete("/v1/contexts/ctx-nope"),
        client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "context_id": "ctx-no"}
        ),
        client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "context_id": "ctx-nope"}),
    ):
        error = error_of(response, 404)
        assert error["code"] == "context_not_found" and error["param"] == "context_id"


def test_expiry(client: TestClient, engine: FakeEngine, clock: Clock) -> None:
    ctx = create(client, messages=SYSTEM, ttl_seconds=10)
    registry = client.app.state.server.contexts  # type: ignore[attr-defined]
    clock.now = T0 + 9.9
    assert client.get(f"/v1/contexts/{ctx['id']}").status_code == 200
    clock.now = T0 + 10
    assert error_of(client.get(f"/v1/contexts/{ctx['id']}"), 404)["code"] == "context_not_found"
    chat = {"model": MODEL, "messages": QUESTION, "context_id": ctx["id"]}
    assert error_of(client.post("/v1/chat/completions", json=chat), 404)["code"] == "context_not_found"
    # Expired entries are dropped even when nobody asks for them again.
    other = create(client, messages=SYSTEM, ttl_seconds=5)
    clock.now += 5
    assert len(registry) == 0
    assert error_of(client.delete(f"/v1/contexts/{other['id']}"), 404)["code"] == "context_not_found"
    assert engine.deleted == []  # the engine unpins expired contexts itself


def test_context_of_another_model_is_400(client: TestClient, engine: FakeEngine) -> None:
    registry = client.app.state.server.contexts  # type: ignore[attr-defined]
    message = ChatMessage.model_validate(SYSTEM[0])
    registry.add(Context("ctx-other", "other-model", [1, 2], [message], None, None, int(T0), T0 + 60))
    chat = {"model": MODEL, "messages": QUESTION, "context_id": "ctx-other"}
    error = error_of(client.post("/v1/chat/completions", json=chat), 400)
    assert error["param"] == "context_id" and "other-model" in error["message"]
    assert engine.calls == []


# ---- prompt building -------------------------------------------------------------------------------------
def test_chat_with_messages_context_renders_one_conversation(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, messages=SYSTEM)
    body = {"model": MODEL, "messages": QUESTION, "context_id": ctx["id"], "max_tokens": 5}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    call = engine.calls[-1]
    assert call.prompt == template_ids(engine.tokenizer, SYSTEM + QUESTION)
    assert call.prompt[: ctx["tokens"]] == engine.context_calls[-1].prompt_token_ids  # prefix-stable here
    assert call.context_id == ctx["id"] and call.cache_salt is None


def test_completion_with_messages_context_appends_the_prompt(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, messages=SYSTEM)
    context_ids = engine.context_calls[-1].prompt_token_ids
    body = {"model": MODEL, "prompt": "Paris is", "context_id": ctx["id"], "max_tokens": 5}
    assert client.post("/v1/completions", json=body).status_code == 200
    own = engine.tokenizer.encode("Paris is", add_special_tokens=False)
    assert engine.calls[-1].prompt == context_ids + own
    assert engine.calls[-1].context_id == ctx["id"]


def test_prompt_context(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, prompt="Document: Paris is the capital of France.")
    context_ids = engine.context_calls[-1].prompt_token_ids
    # Chat: the context's tokens, then the request's own rendered conversation.
    body = {"model": MODEL, "messages": QUESTION, "context_id": ctx["id"], "max_tokens": 5}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert engine.calls[-1].prompt == context_ids + template_ids(engine.tokenizer, QUESTION)
    # Completions: text and token-id prompts, one engine request each, every one after the context.
    body = {"model": MODEL, "prompt": [[7, 8], [9]], "context_id": ctx["id"], "max_tokens": 5, "echo": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [c.prompt for c in engine.calls[-2:]] == [[*context_ids, 7, 8], [*context_ids, 9]]
    assert {c.context_id for c in engine.calls[-2:]} == {ctx["id"]}
    # echo returns the request's own prompt, not the context
    decoded = engine.tokenizer.decode([7, 8], skip_special_tokens=False)
    assert response.json()["choices"][0]["text"] == decoded + " Paris."


def test_context_length_counts_the_whole_prompt(client: TestClient, engine: FakeEngine) -> None:
    ctx = create(client, prompt=[5] * 200)
    ok = {"model": MODEL, "prompt": [5] * 30, "max_tokens": 30}
    assert client.post("/v1/completions", json=ok).status_code == 200
    error = error_of(client.post("/v1/completions", json={**ok, "context_id": ctx["id"]}), 400)
    assert error["code"] == "context_length_exceeded" and "260 tokens" in error["message"]
    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 60, "context_id": ctx["id"]}
    assert error_of(client.post("/v1/chat/completions", json=chat), 400)["code"] == "context_length_exceeded"
    # A context must itself leave room for a request.
    too_long = error_of(client.post("/v1/contexts", json={"model": MODEL, "prompt": [5] * 256}), 400)
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "prompt"


# ---- cache salt ------------------------------------------------------------------------------------------
def test_cache_salt(client: TestClient, engine: FakeEngine) -> None:
    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 5}
    assert client.post("/v1/chat/completions", json={**chat, "cache_salt": "s1"}).status_code == 200
    assert (engine.calls[-1].cache_salt, engine.calls[-1].context_id) == ("s1", None)
    assert client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi", "cache_salt": "s2"}
    ).is_success
    assert engine.calls[-1].cache_salt == "s2"
    assert error_of(client.post("/v1/chat/completions", json={**chat, "cache_salt": ""}), 400)["param"] == (
        "cache_salt"
    )

    salted = create(client, messages=SYSTEM, cache_salt="tenant-a")["id"]
    response = client.post(
        "/v1/chat/completions", json={**chat, "context_id": salted, "cache_salt": "tenant-a"}
    )
    assert response.status_code == 200
    assert (engine.calls[-1].cache_salt, engine.calls[-1].context_id) == ("tenant-a", salted)


def test_context_is_bound_to_its_salt(client: TestClient, engine: FakeEngine) -> None:
    """A context id is no bearer token: with another salt, or none, it is exactly as unknown as a made-up id
    (same status, code, param and message shape) for use, retrieval and deletion."""
    salted = create(client, messages=SYSTEM, cache_salt="tenant-a")["id"]
    plain = create(client, messages=SYSTEM)["id"]
    unknown = error_of(client.get("/v1/contexts/ctx-made-up"), 404)
    chat = {"model": MODEL, "messages": QUESTION, "max_tokens": 5}
    for context_id, salts in ((salted, [None, "tenant-b"]), (plain, ["tenant-b"])):
        for salt in salts:
            body_salt = {} if salt is None else {"cache_salt": salt}
            header = {} if salt is None else {"x-cache-salt": salt}
            for response in (
                client.post("/v1/chat/completions", json={**chat, "context_id": context_id, **body_salt}),
                client.post(
                    "/v1/completions",
                    json={"model": MODEL, "prompt": "Hi", "context_id": context_id, **body_salt},
                ),
                client.get(f"/v1/contexts/{context_id}", headers=header),
                client.delete(f"/v1/contexts/{context_id}", headers=header),
            ):
                error = error_of(response, 404)
                assert error == {**unknown, "message": unknown["message"].replace("ctx-made-up", context_id)}
    assert engine.calls == [] and engine.deleted == []
    # Under its own salt (the header for GET/DELETE) the context is there, and goes.
    assert client.get(f"/v1/contexts/{salted}", headers={"x-cache-salt": "tenant-a"}).json()["id"] == salted
    assert client.get(f"/v1/contexts/{plain}").json()["id"] == plain
    assert client.delete(f"/v1/contexts/{salted}", headers={"x-cache-salt": "tenant-a"}).status_code == 200
    assert engine.deleted == [salted]
    too_long = client.get(f"/v1/contexts/{plain}", headers={"x-cache-salt": "s" * 257})
    assert error_of(too_long, 400)["param"] == "x-cache-salt"


# ---- usage -----------------------------------------------------------------------------------------------
def sse_events(text: str) -> list[Any]:
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_cached_tokens_in_every_usage(client: TestClient, engine: FakeEngine) -> None:
    engine.cached_tokens = 7
    ctx = create(client, messages=SYSTEM)["id"]
    chat = {"model": MODEL, "messages": QUESTION, "context_id": ctx, "max_tokens": 5}
    completion = {"model": MODEL, "prompt": ["a", "b"], "context_id": ctx, "max_tokens": 5}
    for path, body, cached in (("/v1/chat/completions", chat, 7), ("/v1/completions", completion, 14)):
        usage = client.post(path, json=body).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": cached}
        streamed = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
        events = sse_events(streamed.text)
        assert events[-1]["choices"] == [] and events[-1]["usage"] == usage
        assert all(e["usage"] is None for e in events[:-1])


# ---- engine failures and bad bodies ----------------------------------------------------------------------
def test_context_limit_is_429(client: TestClient, engine: FakeEngine) -> None:
    engine.mode = "limit"
    response = client.post("/v1/contexts", json={"model": MODEL, "messages": SYSTEM})
    error = error_of(response, 429)
    assert error["code"] == "context_limit_exceeded"
    assert (
        "cap of 32 pinned context tokens" in error["message"] and "--max-context-tokens" in error["message"]
    )
    assert len(client.app.state.server.contexts) == 0  # type: ignore[attr-defined]


def test_engine_refusals(client: TestClient, engine: FakeEngine) -> None:
    engine.mode = "bad"
    error = error_of(client.post("/v1/contexts", json={"model": MODEL, "prompt": "x"}), 400)
    assert "refuses" in error["message"] and error["param"] == "prompt"
    engine.mode = "dead"
    assert error_of(client.post("/v1/contexts", json={"model": MODEL, "prompt": "x"}), 503)["code"] == (
        "engine_dead"
    )
    assert error_of(client.post("/reset_prefix_cache"), 503)["code"] == "engine_dead"
    engine.alive = False
    assert error_of(client.post("/v1/contexts", json={"model": MODEL, "prompt": "x"}), 503)
    assert error_of(client.post("/reset_prefix_cache"), 503)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": SYSTEM, "prompt": "x"}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": ["a"]}, 400, "prompt"),
        ({"prompt": [1, 10**9]}, 400, "prompt"),
        ({"prompt": "x", "ttl_seconds": 0}, 400, "ttl_seconds"),
        ({"prompt": "x", "ttl_seconds": -1}, 400, "ttl_seconds"),
        ({"prompt": "x", "ttl_seconds": MAX_CONTEXT_TTL + 1}, 400, "ttl_seconds"),
        ({"prompt": "x", "ttl_seconds": "60"}, 400, "ttl_seconds"),
        ({"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
        ({"prompt": "x", "cache_salt": 5}, 400, "cache_salt"),
        ({"prompt": "x", "tll_seconds": 60}, 400, "tll_seconds"),
        ({"prompt": "x", "model": "gpt-4o"}, 404, "model"),
    ],
)
def test_bad_context_bodies(
    client: TestClient, engine: FakeEngine, body: dict, status: int, param: str
) -> None:
    error = error_of(client.post("/v1/contexts", json={"model": MODEL, **body}), status)
    assert error["param"] == param, error
    assert engine.context_calls == []


def test_missing_model_and_bad_json(client: TestClient) -> None:
    assert error_of(client.post("/v1/contexts", json={"prompt": "x"}), 400)["param"] == "model"
    assert error_of(client.post("/v1/contexts", content=b"{"), 400)
    body = {"model": MODEL, "messages": QUESTION, "context_id": 5}
    assert error_of(client.post("/v1/chat/completions", json=body), 400)["param"] == "context_id"


# ---- admin and auth --------------------------------------------------------------------------------------
def test_reset_prefix_cache(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/reset_prefix_cache")
    assert response.status_code == 200 and response.json() == {"reset": True}
    assert engine.resets == 1


def test_auth(engine: FakeEngine, clock: Clock) -> None:
    client = make_client(engine, clock, api_key="secret")
    wrong = {"Authorization": "Bearer nope"}
    right = {"Authorization": "Bearer secret"}
    for method, path, body in (
        ("POST", "/reset_prefix_cache", None),
        ("POST", "/v1/contexts", {"model": MODEL, "prompt": "x"}),
        ("GET", "/v1/contexts/ctx-x", None),
        ("DELETE", "/v1/contexts/ctx-x", None),
    ):
        assert error_of(client.request(method, path, json=body), 401)["code"] == "invalid_api_key"
        assert (
            error_of(client.request(method, path, json=body, headers=wrong), 401)["code"] == "invalid_api_key"
        )
    assert engine.resets == 0 and engine.context_calls == []
    assert client.post("/reset_prefix_cache", headers=right).json() == {"reset": True}
    ctx = client.post("/v1/contexts", json={"model": MODEL, "prompt": "x"}, headers=right).json()
    assert client.get(f"/v1/contexts/{ctx['id']}", headers=right).status_code == 200


# ---- serve flags -----------------------------------------------------------------------------------------
def test_cache_flags_parse() -> None:
    args = build_parser().parse_args(["serve"])
    assert not args.no_prefix_caching and args.host_cache_memory is None and args.max_context_tokens is None
    args = build_parser().parse_args(
        ["serve", "--no-prefix-caching", "--host-cache-memory", "2GiB", "--max-context-tokens", "4096"]
    )
    assert args.no_prefix_caching and args.host_cache_memory == 2 << 30 and args.max_context_tokens == 4096
    assert build_parser().parse_args(["serve", "--host-cache-memory", "0"]).host_cache_memory == 0
    for bad in (["--host-cache-memory", "lots"], ["--max-context-tokens", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])


def test_cache_flags_reach_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """`deepflow serve` builds the real EngineConfig of each model from the flags (the spec every TE gets)."""
    from deepflow.api.cli import build_spec

    argv = ["serve", "--served-model-name", "m", "--no-prefix-caching", "--host-cache-memory", "0"]
    spec = build_spec(build_parser().parse_args([*argv, "--max-context-tokens", "100"]))
    (model,) = spec.models
    config = model.engine
    assert model.name == "m" and config.enable_prefix_caching is False
    assert config.host_cache_memory == 0 and config.max_context_tokens == 100
    default = type(config)()
    (model,) = build_spec(build_parser().parse_args(["serve", "--served-model-name", "m"])).models
    assert model.engine.enable_prefix_caching is True and model.engine.max_context_tokens is None
    assert model.engine.host_cache_memory == default.host_cache_memory


def test_sqlite_registry_is_shared_and_expires(tmp_path: Path) -> None:
    """Two job executors' registries over one file: what one adds the other resolves, deletes and expires."""
    from deepflow.api.contexts import SQLiteContextRegistry

    now = [1000.0]
    one = SQLiteContextRegistry(tmp_path / "contexts.db", clock=lambda: now[0])
    other = SQLiteContextRegistry(tmp_path / "contexts.db", clock=lambda: now[0])
    messages = [ChatMessage.model_validate({"role": "system", "content": "Be brief."})]
    chat_ctx = Context("ctx-a", "m", [1, 2, 3], messages, None, "salt", 1000, expires_at=1060.0)
    prompt_ctx = Context("ctx-b", "m", [4, 5], None, [4, 5], None, 1000, expires_at=1010.0)
    one.add(chat_ctx)
    one.add(prompt_ctx)
    assert other.get("ctx-a") == chat_ctx and other.get("ctx-b") == prompt_ctx and len(other) == 2
    assert other.resolve("ctx-a", "salt", "m") == (chat_ctx, "salt")
    now[0] = 1010.0  # ctx-b's TTL ran out
    with pytest.raises(APIError) as missing:
        one.get("ctx-b")
    assert missing.value.status_code == 404 and len(one) == 1
    assert other.pop("ctx-a") == chat_ctx
    with pytest.raises(APIError):
        one.get("ctx-a")
