"""The job executor's admin routes against a fake engine and a fake platform: `/v1/jobs/{id}` (the id a
client holds is its response's `id`) and `/v1/cluster`, their errors, and the API key they need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deepflow.api.server import build_app
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine

MODEL = "fake-model"
KEY = {"Authorization": "Bearer secret"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 5}
CLUSTER = {"tes": [{"id": "te-0", "alive": True, "running": 1}, {"id": "te-1", "alive": False, "running": 0}]}


class FakePlatform:
    """Knows a job for every request the engine was given (the engine request id is the job id); its cluster
    answer is CLUSTER, or `failure` raised."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.failure: Exception | None = None
        self.cluster_calls = 0

    def job(self, job_id: str) -> dict[str, Any] | None:
        calls = [c for c in self.engine.calls if c.request_id == job_id]
        if not calls:
            return None
        return {
            "id": job_id,
            "state": "finished",
            "tasks": [{"te": "te-0", "prompt_tokens": len(calls[0].prompt)}],
        }

    async def cluster(self) -> dict[str, Any]:
        self.cluster_calls += 1
        if self.failure is not None:
            raise self.failure
        return CLUSTER

    async def scale(self, model: str, tes: int, role: str = "colocated") -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        if model != MODEL:
            raise ValueError(f"unknown model {model!r}")
        if tes == 0 and role == "colocated":  # as the CM answers for a model with no prefill/decode TEs
            raise ValueError(f"model {model} would be left without a way to serve")
        return {"scaled": {model: tes, "role": role}}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer(smollm2_dir)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def platform(engine: FakeEngine) -> FakePlatform:
    return FakePlatform(engine)


@pytest.fixture
def client(engine: FakeEngine, platform: FakePlatform) -> TestClient:
    return TestClient(build_app(engine, MODEL, platform=platform), raise_server_exceptions=False)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_job_of_a_response_id(client: TestClient, engine: FakeEngine) -> None:
    response_id = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    assert response_id.startswith("chatcmpl-")
    job = client.get(f"/v1/jobs/{response_id}")
    assert job.status_code == 200, job.text
    assert job.json() == {
        "id": response_id,
        "state": "finished",
        "tasks": [{"te": "te-0", "prompt_tokens": len(engine.calls[0].prompt)}],
    }


def test_unknown_job_is_404(client: TestClient) -> None:
    error = error_of(client.get("/v1/jobs/cmpl-nope"), 404)
    assert error["code"] == "job_not_found" and error["type"] == "invalid_request_error"
    assert "cmpl-nope" in error["message"]


def test_cluster(client: TestClient, platform: FakePlatform) -> None:
    response = client.get("/v1/cluster")
    assert response.status_code == 200 and response.json() == CLUSTER
    assert platform.cluster_calls == 1


@pytest.mark.parametrize(
    "failure", [TimeoutError(), ConnectionError("cluster manager refused the connection")], ids=repr
)
def test_cluster_unreachable_is_503(client: TestClient, platform: FakePlatform, failure: Exception) -> None:
    platform.failure = failure
    error = error_of(client.get("/v1/cluster"), 503)
    assert error["type"] == "service_unavailable_error" and error["code"] == "platform_unavailable"
    assert error["message"].startswith("The cluster state is unavailable: ")
    assert (str(failure) or "the cluster manager did not answer (TimeoutError)") in error["message"]


def test_without_a_platform(engine: FakeEngine) -> None:
    client = TestClient(build_app(engine, MODEL), raise_server_exceptions=False)
    response_id = client.post("/v1/chat/completions", json=CHAT).json()["id"]
    assert error_of(client.get(f"/v1/jobs/{response_id}"), 404)["code"] == "job_not_found"
    error = error_of(client.get("/v1/cluster"), 503)
    assert error["type"] == "service_unavailable_error" and "no job executor platform" in error["message"]


def test_admin_routes_need_the_key(engine: FakeEngine, platform: FakePlatform) -> None:
    client = TestClient(build_app(engine, MODEL, "secret", platform=platform), raise_server_exceptions=False)
    response_id = client.post("/v1/chat/completions", json=CHAT, headers=KEY).json()["id"]
    for path in (f"/v1/jobs/{response_id}", "/v1/jobs/cmpl-nope", "/v1/cluster"):
        assert error_of(client.get(path), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert error_of(client.get(path, headers=wrong), 401)["code"] == "invalid_api_key"
    assert platform.cluster_calls == 0
    assert client.get(f"/v1/jobs/{response_id}", headers=KEY).json()["id"] == response_id
    assert client.get("/v1/cluster", headers=KEY).json() == CLUSTER


def test_scale(client: TestClient, platform: FakePlatform) -> None:
    response = client.post("/v1/cluster/scale", json={"model": MODEL, "tes": 3})
    assert response.status_code == 200 and response.json() == {"scaled": {MODEL: 3, "role": "colocated"}}
    response = client.post("/v1/cluster/scale", json={"model": MODEL, "tes": 2, "role": "decode"})
    assert response.status_code == 200 and response.json()["scaled"]["role"] == "decode"  # per group
    error = error_of(client.post("/v1/cluster/scale", json={"model": "other", "tes": 2}), 400)
    assert error["param"] == "model" and "unknown model" in error["message"]
    error = error_of(client.post("/v1/cluster/scale", json={"model": MODEL, "tes": 0}), 400)
    assert error["param"] == "tes" and "without a way to serve" in error["message"]  # the CM refused
    for bad in (
        {"model": MODEL},
        {"model": MODEL, "tes": 2, "extra": 1},
        {"model": MODEL, "tes": -1},
        {"model": MODEL, "tes": 1, "role": "mixer"},
    ):
        assert error_of(client.post("/v1/cluster/scale", json=bad), 400)["type"] == "invalid_request_error"
    platform.failure = TimeoutError("the cluster manager did not answer within 5 s")
    error = error_of(client.post("/v1/cluster/scale", json={"model": MODEL, "tes": 2}), 503)
    assert error["code"] == "platform_unavailable"


def test_scale_needs_the_key_and_a_platform(engine: FakeEngine, platform: FakePlatform) -> None:
    keyed = TestClient(build_app(engine, MODEL, "secret", platform=platform), raise_server_exceptions=False)
    assert (
        error_of(keyed.post("/v1/cluster/scale", json={"model": MODEL, "tes": 2}), 401)["code"]
        == "invalid_api_key"
    )
    bare = TestClient(build_app(engine, MODEL), raise_server_exceptions=False)
    assert (
        error_of(bare.post("/v1/cluster/scale", json={"model": MODEL, "tes": 2}), 503)["code"]
        == "platform_unavailable"
    )
