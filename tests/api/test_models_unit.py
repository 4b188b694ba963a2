"""Several models in one app, against fake engines (no model): routing by `model`, the model list, contexts
tied to the model that made them, health, cache resets and one merged Prometheus exposition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from deepflow.api.server import build_app
from deepflow.engine.metrics import EngineMetrics
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine
from tests.api.server_utils import metric_value

QUESTION = [{"role": "user", "content": "Capital of France?"}]


class ShoutingTokenizer(Tokenizer):
    """Encodes upper-cased text: a second model whose token ids differ from the first's for the same text."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text.upper(), add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def shouting(smollm2_dir: Path) -> Tokenizer:
    return ShoutingTokenizer(smollm2_dir)


@pytest.fixture
def alpha(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer, "/models/alpha")


@pytest.fixture
def beta(shouting: Tokenizer) -> FakeEngine:
    engine = FakeEngine(shouting, "/models/beta")
    engine.max_model_len = 128
    return engine


@pytest.fixture
def client(alpha: FakeEngine, beta: FakeEngine) -> TestClient:
    return TestClient(build_app({"alpha": alpha, "beta": beta}), raise_server_exceptions=False)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_build_app_arguments(alpha: FakeEngine) -> None:
    with pytest.raises(TypeError, match="served_model_name"):
        build_app(alpha)
    with pytest.raises(TypeError, match="mapping"):
        build_app({"alpha": alpha}, "alpha")
    with pytest.raises(ValueError, match="at least one model"):
        build_app({})


def test_models_lists_every_model_in_order(client: TestClient) -> None:
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["root"], m["max_model_len"]) for m in listed] == [
        ("alpha", "/models/alpha", 64),
        ("beta", "/models/beta", 128),
    ]
    assert client.get("/v1/models/beta").json() == listed[1]
    assert client.get("/v1/models/alpha").json() == listed[0]
    assert error_of(client.get("/v1/models/gamma"), 404)["code"] == "model_not_found"


def test_generation_routes_by_model(client: TestClient, alpha: FakeEngine, beta: FakeEngine) -> None:
    chat = client.post("/v1/chat/completions", json={"model": "beta", "messages": QUESTION})
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "beta" and len(beta.calls) == 1 and alpha.calls == []
    # Beta's own tokenizer built the prompt: upper-cased text.
    template = beta.tokenizer.apply_chat_template(QUESTION)
    assert beta.calls[0].prompt == beta.tokenizer.encode(template, add_special_tokens=False)

    completion = client.post(
        "/v1/completions", json={"model": "alpha", "prompt": "Paris is", "max_tokens": 60}
    )
    assert completion.status_code == 200 and completion.json()["model"] == "alpha"
    assert alpha.calls[0].prompt == alpha.tokenizer.encode("Paris is") and len(beta.calls) == 1
    # Each model's own limits: 100 new tokens fit beta's 128-token context, not alpha's 64.
    body = {"prompt": "Paris is", "max_tokens": 100}
    assert client.post("/v1/completions", json={**body, "model": "beta"}).status_code == 200
    error = error_of(client.post("/v1/completions", json={**body, "model": "alpha"}), 400)
    assert error["code"] == "context_length_exceeded" and "64 tokens" in error["message"]


def test_unknown_model_is_404_everywhere(client: TestClient, alpha: FakeEngine, beta: FakeEngine) -> None:
    for path, body in (
        ("/v1/chat/completions", {"messages": QUESTION}),
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/contexts", {"prompt": "Hi"}),
        ("/tokenize", {"prompt": "Hi"}),
        ("/detokenize", {"tokens": [1]}),
    ):
        error = error_of(client.post(path, json={"model": "gamma", **body}), 404)
        assert (
            error["code"] == "model_not_found" and error["param"] == "model" and "gamma" in error["message"]
        )
    assert alpha.calls == beta.calls == [] and alpha.context_calls == beta.context_calls == []


def test_tokenize_per_model(client: TestClient, alpha: FakeEngine, beta: FakeEngine) -> None:
    def tokenize(**body: Any) -> dict[str, Any]:
        response = client.post("/tokenize", json={"prompt": "hello world", **body})
        assert response.status_code == 200, response.text
        return response.json()

    own_alpha, own_beta = alpha.tokenizer.encode("hello world"), beta.tokenizer.encode("hello world")
    assert own_alpha != own_beta
    assert tokenize(model="alpha") == {"tokens": own_alpha, "count": len(own_alpha), "max_model_len": 64}
    assert tokenize(model="beta") == {"tokens": own_beta, "count": len(own_beta), "max_model_len": 128}
    assert tokenize() == tokenize(model="alpha")  # no model: the first one
    detokenized = client.post("/detokenize", json={"model": "beta", "tokens": own_beta}).json()
    assert detokenized == {"prompt": "HELLO WORLD"}


def test_context_belongs_to_the_model_that_made_it(
    client: TestClient, alpha: FakeEngine, beta: FakeEngine
) -> None:
    created = client.post("/v1/contexts", json={"model": "beta", "prompt": "A long document."})
    assert created.status_code == 200, created.text
    ctx = created.json()
    assert ctx["model"] == "beta" and alpha.context_calls == []
    (pinned,) = beta.context_calls
    assert pinned.context_id == ctx["id"] and pinned.prompt_token_ids == beta.tokenizer.encode(
        "A long document."
    )

    body = {"messages": QUESTION, "context_id": ctx["id"], "max_tokens": 5}
    error = error_of(client.post("/v1/chat/completions", json={**body, "model": "alpha"}), 400)
    assert error["param"] == "context_id" and "'beta'" in error["message"] and "'alpha'" in error["message"]
    completion = {"prompt": "Hi", "context_id": ctx["id"], "max_tokens": 5}
    assert error_of(client.post("/v1/completions", json={**completion, "model": "alpha"}), 400)
    assert alpha.calls == []

    assert client.post("/v1/chat/completions", json={**body, "model": "beta"}).status_code == 200
    assert beta.calls[-1].context_id == ctx["id"]
    assert beta.calls[-1].prompt[: ctx["tokens"]] == pinned.prompt_token_ids
    assert client.get(f"/v1/contexts/{ctx['id']}").json() == ctx
    assert client.delete(f"/v1/contexts/{ctx['id']}").status_code == 200
    assert beta.deleted == [ctx["id"]] and alpha.deleted == []  # unpinned where it was pinned


def test_health_names_the_dead_model(client: TestClient, alpha: FakeEngine, beta: FakeEngine) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    beta.alive = False
    error = error_of(client.get("/health"), 503)
    assert error["code"] == "engine_dead" and "'beta'" in error["message"] and "alpha" not in error["message"]
    # The live model still serves; the dead one answers 503 naming itself.
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": "Hi"}).status_code == 200
    error = error_of(client.post("/v1/completions", json={"model": "beta", "prompt": "Hi"}), 503)
    assert error["code"] == "engine_dead" and "'beta'" in error["message"]


def test_reset_prefix_cache_resets_every_model(
    client: TestClient, alpha: FakeEngine, beta: FakeEngine
) -> None:
    assert client.post("/reset_prefix_cache").json() == {"reset": True}
    assert (alpha.resets, beta.resets) == (1, 1)
    beta.alive = False
    error = error_of(client.post("/reset_prefix_cache"), 503)
    assert error["code"] == "engine_dead" and "'beta'" in error["message"]
    assert (alpha.resets, beta.resets) == (1, 1)  # refused before resetting any


def test_metrics_of_every_engine_in_one_exposition(alpha: FakeEngine, beta: FakeEngine) -> None:
    # Both engines label their metrics alike (as two engines of one model folder would): the app relabels
    # each with its served name so the samples stay apart.
    alpha.metrics = EngineMetrics("same-folder")  # type: ignore[attr-defined]
    beta.metrics = EngineMetrics("same-folder")  # type: ignore[attr-defined]
    alpha.metrics.record_finished("stop", 0.5)  # type: ignore[attr-defined]
    beta.metrics.record_finished("length", 0.5)  # type: ignore[attr-defined]
    beta.metrics.record_finished("length", 0.7)  # type: ignore[attr-defined]
    client = TestClient(build_app({"alpha": alpha, "beta": beta}), raise_server_exceptions=False)
    client.get("/health")
    text = client.get("/metrics").text

    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert text.count("# TYPE http_requests_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: no clashing families
    running = {s.labels["model_name"] for s in families["vllm:num_requests_running"].samples}
    assert running == {"alpha", "beta"}
    success = "vllm:request_success_total"
    assert metric_value(text, success, model_name="alpha", finished_reason="stop") == 1.0
    assert metric_value(text, success, model_name="beta", finished_reason="length") == 2.0
    assert metric_value(text, success, model_name="alpha", finished_reason="length") is None
    assert metric_value(text, "vllm:e2e_request_latency_seconds_count", model_name="beta") == 2.0
    assert 'model_name="same-folder"' not in text
    assert metric_value(text, "http_requests_total", handler="/health", status="200") == 1.0
