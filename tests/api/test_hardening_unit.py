"""What a hostile client can send, against the app over the fake engine: every malformed body is a 400 (never
a 500, never a 200 stream then an error event), bodies over the limit are 413 before parsing, big bodies do
not stall the event loop, every route but /health needs the key, and work per request is bounded."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import deepflow.api.body
from deepflow.api.limits import DEFAULT_MAX_BODY_BYTES, MAX_JSON_DEPTH, OFFLOAD_BYTES, APILimits
from deepflow.api.server import build_app
from deepflow.cli import build_parser
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine

MODEL = "fake-model"
KEY = {"Authorization": "Bearer secret"}
SURROGATE = "hi \ud800"  # json.dumps writes it as the escape "\ud800", as a hostile client would


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(build_app(engine, MODEL), raise_server_exceptions=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hi", **extra}


# ---- 1. malformed values: one generic check, every route ---------------------------------------------------
BIG = 2**64 * 64  # 1180591620717411303424, the hostile test's priority


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": SURROGATE}]),
            "messages[0].content",
        ),
        ("/v1/completions", completion(prompt=SURROGATE), "prompt"),
        ("/v1/completions", completion(prompt=["ok", SURROGATE]), "prompt[1]"),
        ("/v1/contexts", {"model": MODEL, "prompt": SURROGATE}, "prompt"),
        ("/tokenize", {"prompt": SURROGATE}, "prompt"),
        ("/v1/chat/completions", chat(model=SURROGATE), "model"),
        ("/v1/completions", completion(priority=BIG), "priority"),
        ("/v1/completions", completion(top_k=BIG), "top_k"),
        ("/v1/completions", completion(stop_token_ids=[1, BIG]), "stop_token_ids[1]"),
        ("/v1/chat/completions", chat(seed=-BIG), "seed"),
        ("/v1/completions", completion(prompt=[1, BIG]), "prompt[1]"),
        ("/detokenize", {"tokens": [BIG]}, "tokens[0]"),
        # In int64 but out of the field's range.
        ("/v1/completions", completion(priority=2**40), "priority"),
        ("/v1/completions", completion(stop_token_ids=[2**40]), "stop_token_ids[0]"),
        ("/v1/chat/completions", chat(**{"x\ud800": 1}), None),  # a key with a surrogate
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_values_are_400(
    client: TestClient, engine: FakeEngine, path: str, body: dict[str, Any], param: str | None, stream: bool
) -> None:
    if stream:
        if path not in ("/v1/chat/completions", "/v1/completions"):
            pytest.skip("no stream on this route")
        body = {**body, "stream": True}
    error = error_of(
        client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}), 400
    )
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert engine.calls == [] and engine.context_calls == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "fake-model", "prompt": "hi", "priority": '
        + b"9" * 5000
        + b"}",  # past int's 4,300 digits
        b'{"model": "fake-model", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # RecursionError in json
        b'{"model": "fake-model", "prompt": '
        + b"[" * (MAX_JSON_DEPTH + 1)
        + b"]" * (MAX_JSON_DEPTH + 1)
        + b"}",
        b'{"model": "fake-model", "prompt": "hi", "repetition_penalty": Infinity}',
        b'{"model": "fake-model", "prompt": "hi", "temperature": NaN}',
        b'{"model": "fake-model", "prompt": "hi", "repetition_penalty": 1e999}',  # parses to inf
        b'{"model": "fake-model", "prompt": "\xff"}',  # not UTF-8
        b'{"model": "fake-model", "prompt": "hi", "stream": true, "priority": 1180591620717411303424}',
    ],
    ids=["4301-digits", "deep-5000", "deep-33", "Infinity", "NaN", "1e999", "bad-utf8", "stream-bigint"],
)
def test_unparseable_or_unrepresentable_bodies_are_400(
    client: TestClient, engine: FakeEngine, raw: bytes
) -> None:
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert error_of(response, 400)["type"] == "invalid_request_error"
    assert engine.calls == []


def test_float_ranges(client: TestClient) -> None:
    for name, value in (("repetition_penalty", 10.5), ("repetition_penalty", 0.0), ("temperature", 2.5)):
        assert (
            error_of(client.post("/v1/completions", json=completion(**{name: value})), 400)["param"] == name
        )


# ---- 2. body size limit, before parsing, and the event loop stays free -------------------------------------
def test_body_over_the_limit_is_413_from_content_length(client: TestClient, engine: FakeEngine) -> None:
    big = json.dumps(completion(prompt="a" * (5 << 20))).encode()  # 5 MiB > the 4 MiB default
    assert len(big) > DEFAULT_MAX_BODY_BYTES
    error = error_of(client.post("/v1/completions", content=big), 413)
    assert error["code"] == "request_too_large" and str(DEFAULT_MAX_BODY_BYTES) in error["message"]
    assert engine.calls == []


@pytest.mark.anyio
async def test_chunked_body_counted_as_it_arrives_while_health_answers(engine: FakeEngine) -> None:
    """A chunked upload (no Content-Length) is refused once its bytes pass the limit; while it is still
    being sent, /health answers."""
    app = build_app(engine, MODEL, limits=APILimits(max_body_bytes=1024))
    half_sent, go_on = asyncio.Event(), asyncio.Event()
    rest_sent = False

    async def upload() -> AsyncIterator[bytes]:
        nonlocal rest_sent
        yield b'{"model": "fake-model", "prompt": "'
        yield b"a" * 600
        half_sent.set()
        await go_on.wait()
        yield b"a" * 600  # past the limit
        rest_sent = True
        yield b'"}'

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        task = asyncio.create_task(client.post("/v1/completions", content=upload()))
        await half_sent.wait()
        health = await client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert not task.done()  # the upload is still in progress
        go_on.set()
        response = await task
    assert error_of(response, 413)["code"] == "request_too_large"
    assert not rest_sent  # refused at the chunk that passed the limit, not after reading everything
    assert engine.calls == []


@pytest.mark.anyio
async def test_big_body_is_parsed_off_the_event_loop(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing is held inside until /health has answered: on the event loop it would hold /health too."""
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    validate = deepflow.api.body.validate_body

    def held(raw: bytes, model: Any) -> Any:
        entered.set()
        release.wait(timeout=60)  # only a guard against a hang; the assertions below do not depend on it
        try:
            return validate(raw, model)
        finally:
            finished.set()

    monkeypatch.setattr(deepflow.api.body, "validate_body", held)
    app = build_app(engine, MODEL)
    prompt = "Paris " * (OFFLOAD_BYTES // 5)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        task = asyncio.create_task(client.post("/tokenize", json={"prompt": prompt}))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        health = await client.get("/health")
        assert health.status_code == 200 and not finished.is_set()
        release.set()
        response = await task
    assert response.status_code == 200 and response.json()["count"] > OFFLOAD_BYTES // 5


def test_body_size_flag() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.max_body_size == DEFAULT_MAX_BODY_BYTES and not args.metrics_public
    args = build_parser().parse_args(["serve", "--max-body-size", "1MiB", "--metrics-public"])
    assert args.max_body_size == 1 << 20 and args.metrics_public
    args = build_parser().parse_args(["serve", "--max-sequences-per-request", "64"])
    assert args.max_sequences_per_request == 64


def test_limits_reach_the_spec_and_the_app(engine: FakeEngine) -> None:
    from deepflow.api.cli import build_spec
    from deepflow.platform.spec import ClusterSpec

    argv = [
        "serve",
        "--served-model-name",
        "m",
        "--max-body-size",
        "2KiB",
        "--max-sequences-per-request",
        "3",
    ]
    spec = ClusterSpec.decode(build_spec(build_parser().parse_args(argv)).encode())  # as a JE gets it
    assert spec.api == APILimits(max_body_bytes=2048, max_sequences=3)

    class Platform:  # the job executor: build_app reads its spec's limits
        def __init__(self) -> None:
            self.spec = spec

    client = TestClient(build_app(engine, MODEL, platform=Platform()), raise_server_exceptions=False)  # type: ignore[arg-type]
    assert error_of(client.post("/v1/completions", json=completion(prompt="a" * 3000)), 413)
    assert error_of(client.post("/v1/completions", json=completion(n=4)), 400)["param"] == "n"


def test_limits_from_the_cluster_yaml_and_flags_over_them(tmp_path: Path) -> None:
    from deepflow.api.cli import build_spec

    config = tmp_path / "cluster.yaml"
    config.write_text(
        "models: [{name: m, engine: {model: /models/m}}]\n"
        "api: {max_body_bytes: 2KiB, max_sequences: 3, metrics_public: true}\n"
    )
    spec = build_spec(build_parser().parse_args(["serve", "--config", str(config)]))
    assert spec.api == APILimits(max_body_bytes=2048, max_sequences=3, metrics_public=True)
    argv = ["serve", "--config", str(config), "--max-sequences-per-request", "7"]
    assert build_spec(build_parser().parse_args(argv)).api.max_sequences == 7  # a flag given wins
    config.write_text("models: [{name: m, engine: {model: /models/m}}]\napi: {max_body: 1}\n")
    with pytest.raises(ValueError, match="unknown settings"):
        build_spec(build_parser().parse_args(["serve", "--config", str(config)]))


# ---- 3. the key on every route but /health ----------------------------------------------------------------
@pytest.mark.parametrize("metrics_public", [False, True])
def test_every_route_but_health_needs_the_key(engine: FakeEngine, metrics_public: bool) -> None:
    app = build_app(engine, MODEL, api_key="secret", limits=APILimits(metrics_public=metrics_public))
    client = TestClient(app, raise_server_exceptions=False)
    routes = [
        ("POST", "/tokenize", {"prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
        ("GET", "/version", None),
        ("GET", "/openapi.json", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", completion()),
    ]
    if not metrics_public:
        routes.append(("GET", "/metrics", None))
    for method, path, body in routes:
        assert error_of(client.request(method, path, json=body), 401)["code"] == "invalid_api_key", path
        assert client.request(method, path, json=body, headers=KEY).status_code == 200, path
    assert client.get("/health").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == (200 if metrics_public else 401)
    assert engine.calls and all(c.prompt for c in engine.calls)  # only the keyed completion reached it


# ---- 4. bounded work per request --------------------------------------------------------------------------
def test_prompts_times_n_is_capped(engine: FakeEngine) -> None:
    client = TestClient(
        build_app(engine, MODEL, limits=APILimits(max_sequences=8)), raise_server_exceptions=False
    )
    error = error_of(client.post("/v1/completions", json=completion(prompt=["a", "b", "c"], n=3)), 400)
    assert error["param"] == "n" and "9 sequences" in error["message"] and "at most 8" in error["message"]
    assert error_of(client.post("/v1/chat/completions", json=chat(n=9)), 400)["param"] == "n"
    assert engine.calls == []
    assert client.post("/v1/completions", json=completion(prompt=["a", "b"], n=4)).status_code == 200


def test_min_tokens_must_fit(client: TestClient, engine: FakeEngine) -> None:
    # No max_tokens: chat may run to the context's end (64 tokens here), so min_tokens must fit there.
    error = error_of(client.post("/v1/chat/completions", json=chat(min_tokens=10**9)), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "min_tokens"
    error = error_of(client.post("/v1/chat/completions", json=chat(min_tokens=60)), 400)
    assert error["code"] == "context_length_exceeded"
    # Completions default to 16 tokens: min_tokens above that contradicts max_tokens.
    assert (
        error_of(client.post("/v1/completions", json=completion(min_tokens=17)), 400)["param"] == "min_tokens"
    )
    assert error_of(client.post("/v1/completions", json=completion(max_tokens=10**6)), 400)["code"] == (
        "context_length_exceeded"
    )
    assert engine.calls == []
    assert client.post("/v1/chat/completions", json=chat(min_tokens=5)).status_code == 200


def test_completions_max_tokens_null_is_16(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/completions", json=completion(max_tokens=None)).status_code == 200
    assert engine.calls[-1].params.max_tokens == 16


# ---- 5. cache_salt length ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/contexts"])
def test_cache_salt_is_capped(client: TestClient, engine: FakeEngine, path: str) -> None:
    body = chat() if path == "/v1/chat/completions" else completion()
    assert error_of(client.post(path, json={**body, "cache_salt": "s" * 257}), 400)["param"] == "cache_salt"
    assert engine.calls == [] and engine.context_calls == []
    assert client.post(path, json={**body, "cache_salt": "s" * 256}).status_code == 200


# ---- 9. context timestamps from one clock reading --------------------------------------------------------
def test_context_expires_at_minus_created_is_the_ttl(engine: FakeEngine) -> None:
    now = [1_700_000_000.9]  # a fractional clock: two readings could round apart
    engine.clock = lambda: now[0] + 2.5  # the engine's reading comes after the prefill
    app = build_app(engine, MODEL)
    app.state.server.contexts.clock = lambda: now[0]
    client = TestClient(app, raise_server_exceptions=False)
    ctx = client.post("/v1/contexts", json={"model": MODEL, "prompt": "doc", "ttl_seconds": 600}).json()
    assert ctx["expires_at"] - ctx["created"] == 600
    now[0] += 599.9
    assert client.get(f"/v1/contexts/{ctx['id']}").status_code == 200
    now[0] += 0.1
    assert error_of(client.get(f"/v1/contexts/{ctx['id']}"), 404)["code"] == "context_not_found"
