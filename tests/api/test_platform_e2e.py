"""The HTTP edge of a job executor end to end: a real `deepflow serve` with two models of two TEs each. The
response names the TE that served it, the job behind a response id can be looked up, and one `/metrics`
shows both models. Only the edge's side is checked here; the platform's own records belong to its tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.server_utils import AUTH, ServerProcess, metric_value, smollm2_args, start_server, stop_cleanly

MODELS = ("alpha", "beta")
TE_HEADER = "x-deepflow-te"


@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[ServerProcess]:
    names = [arg for name in MODELS for arg in ("--served-model-name", name)]
    srv = start_server([*smollm2_args(smollm2_dir), "--model", str(smollm2_dir), *names, "--tes", "2"])
    yield srv
    stop_cleanly(srv)


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **extra}


def test_models(http: httpx.Client) -> None:
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == list(MODELS)


def test_each_response_names_a_te_of_its_model(http: httpx.Client) -> None:
    cluster = http.get("/v1/cluster")
    assert cluster.status_code == 200, cluster.text
    seen: dict[str, set[str]] = {}
    for model in MODELS:
        response = http.post("/v1/chat/completions", json=chat(model))
        assert response.status_code == 200 and response.json()["model"] == model
        with http.stream("POST", "/v1/chat/completions", json=chat(model, stream=True)) as streamed:
            assert streamed.status_code == 200
            streamed_te = streamed.headers[TE_HEADER]
            assert "data: [DONE]" in list(streamed.iter_lines())
        seen[model] = {response.headers[TE_HEADER], streamed_te}
        assert all(te in cluster.text for te in seen[model])  # TEs the cluster knows
    assert not seen["alpha"] & seen["beta"]  # a model's requests go to its own TEs


def test_batch_names_every_te_used(http: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": ["one", "two", "three", "four"], "max_tokens": 2}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    te_ids = response.headers[TE_HEADER].split(",")
    assert len(te_ids) == len(set(te_ids)) >= 1
    job = http.get(f"/v1/jobs/{response.json()['id']}").json()  # one job, a task per prompt
    assert job["state"] == "finished" and len(job["tasks"]) == 4
    assert {task["te_id"] for task in job["tasks"]} == set(te_ids)


def test_job_of_a_response(server: ServerProcess, http: httpx.Client) -> None:
    response_id = http.post("/v1/chat/completions", json=chat("beta")).json()["id"]
    job = http.get(f"/v1/jobs/{response_id}")
    assert job.status_code == 200, job.text
    assert response_id in json.dumps(job.json())
    assert http.get("/v1/jobs/chatcmpl-unknown").json()["error"]["code"] == "job_not_found"
    assert httpx.get(f"{server.url}/v1/jobs/{response_id}").status_code == 401  # admin: needs the key


def test_metrics_of_both_models(server: ServerProcess, http: httpx.Client) -> None:
    for model in MODELS:
        assert http.post("/v1/chat/completions", json=chat(model)).status_code == 200
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert text.count("# TYPE vllm:request_success_total counter") == 1
    for model in MODELS:
        assert (
            metric_value(text, "vllm:request_success_total", model_name=model, finished_reason="length") or 0
        ) > 0
