"""Schemathesis against the app's own OpenAPI schema, in process over the fake engine (no model, no server):
valid and invalid bodies, parameters and headers for every operation; no answer may be a 5xx, and every
error is an OpenAI error body (never FastAPI's `{"detail": ...}` or a 422).

A 5xx found here is a bug in the code: fix the code and keep the case below as a regression example, never
narrow the generated data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from deepflow.api.server import build_app
from deepflow.engine.tokenizer import Tokenizer
from tests.api.fake_engine import FakeEngine
from tests.api.test_admin_unit import MODEL, FakePlatform

POST_ROUTES = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/contexts",
    "/v1/cluster/scale",
    "/tokenize",
    "/detokenize",
    "/reset_prefix_cache",
}
BODIES = POST_ROUTES - {"/reset_prefix_cache"}  # the one POST without a body
# Per operation and mode; derandomized so that CI runs the same cases every time (bounded work, no flakes).
EXAMPLES = 150  # a route with a body
FEW_EXAMPLES = 20  # a route with at most a path parameter or a header


@pytest.fixture(scope="module")
def app(smollm2_dir: Path) -> FastAPI:
    engine = FakeEngine(Tokenizer(smollm2_dir))
    # With a platform, so that the admin routes answer rather than being 503 by design.
    return build_app(engine, MODEL, platform=FakePlatform(engine))


def check_answer(status: int, content: bytes, what: str) -> None:
    assert status < 500, f"{what} -> {status}: {content[:500]!r}"
    if status >= 400:
        body = json.loads(content)
        assert set(body) == {"error"}, f"{what} -> {status}: {body}"
        assert set(body["error"]) == {"message", "type", "param", "code"}, f"{what} -> {body}"
        assert status != 422, f"{what}: validation errors are 400s"


def test_schema_lists_every_post_body(app: FastAPI) -> None:
    """Without the bodies in the schema the fuzzer (and client generators) could only send empty POSTs."""
    document = TestClient(app).get("/openapi.json").json()
    paths = document["paths"]
    assert "422" not in json.dumps(document)  # FastAPI's validation answer: ours is a 400 everywhere
    posts = {path for path, ops in paths.items() if "post" in ops}
    assert posts == POST_ROUTES
    for path in BODIES:
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True and "$ref" in body["content"]["application/json"]["schema"], path
        assert {"400", "413"} <= set(paths[path]["post"]["responses"]), path


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_openai_error_bodies(app: FastAPI, mode: GenerationMode) -> None:
    """Every operation of the schema, with valid data and with data that breaks its schema; valid bodies
    get through validation to the handlers (a 2xx on every body route), so their code is fuzzed too."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations if op.method.upper() == "POST"} == POST_ROUTES
    answers: Counter[tuple[str, int]] = Counter()  # (POST path, status) of the cases sent with a body
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
        @settings(
            max_examples=EXAMPLES if operation.body else FEW_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any, served: bool) -> None:
            # Half the bodies name the served model: a random name is a 404 before the handler does any work.
            if served and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            response = case.call()
            check_answer(response.status_code, response.content, f"{case.method} {case.formatted_path}")
            if case.method.upper() == "POST" and case.body is not None:
                answers[(case.path, response.status_code // 100)] += 1

        try:
            run()
        except Unsatisfiable:
            # Only where nothing can be made invalid: no body, and parameters that take any string.
            assert mode is GenerationMode.NEGATIVE and not operation.body, operation.label
    for path in BODIES:
        assert answers[(path, 4)] > 0, (path, answers)  # every body route got bodies it refused...
        if mode is GenerationMode.POSITIVE:
            assert answers[(path, 2)] > 0, (path, answers)  # ...and valid ones it answered


# Cases the fuzzer (or the hostile-client report) found, kept as regressions.
@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", b'{"model": "fake-model", "prompt": "hi", "logit_bias": {"\\ud800": 1}}'),
        ("/v1/completions", b'{"model": "fake-model", "prompt": "hi", "user": "\\udfff"}'),
        ("/detokenize", b'{"tokens": [-1]}'),
        ("/v1/cluster/scale", b'{"model": "\\ud800", "tes": 1}'),
        ("/v1/contexts", b'{"model": "fake-model", "prompt": [], "ttl_seconds": 1e308}'),
    ],
)
def test_regression_examples(app: FastAPI, path: str, raw: bytes) -> None:
    response = TestClient(app, raise_server_exceptions=False).post(
        path, content=raw, headers={"content-type": "application/json"}
    )
    check_answer(response.status_code, response.content, path)
    assert response.status_code == 400
