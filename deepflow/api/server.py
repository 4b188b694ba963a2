"""The OpenAI-compatible HTTP app: routes, bearer auth, request ids, error shapes and metrics.

Bodies are parsed by hand (`parse_body`) rather than through FastAPI's model parameters so that malformed
JSON, unknown fields and bad values all become OpenAI-style 400s with the offending parameter named.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepflow import __version__
from deepflow.api.chat import create_chat_completion, encode_chat
from deepflow.api.completions import create_completion
from deepflow.api.contexts import ContextRegistry, create_context, delete_context, retrieve_context
from deepflow.api.errors import (
    APIError,
    engine_dead,
    from_validation_error,
    install_error_handlers,
    internal_error,
    invalid,
    job_not_found,
    platform_unavailable,
)
from deepflow.api.metrics import HTTPMetrics
from deepflow.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ContextCreateRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ScaleRequest,
    TokenizeRequest,
    TokenizeResponse,
    check_messages,
)
from deepflow.api.state import EngineClient, PlatformView, ServedModels, ServerState, engine_alive

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
REQUEST_ID_HEADER = "x-request-id"


async def parse_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(
            f"We could not parse the JSON body of your request ({exc}). The API expects a JSON object "
            "sent with Content-Type: application/json."
        ) from None
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object, not {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


class RequestContextMiddleware:
    """Pure ASGI (streams and disconnects pass through untouched): request ids, metrics, last-resort 500s."""

    def __init__(self, app: ASGIApp, metrics: HTTPMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = (
            incoming if incoming and len(incoming) <= 256 and incoming.isprintable() else uuid.uuid4().hex
        )
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False
        start = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await internal_error(exc).response(headers={REQUEST_ID_HEADER: request_id})(scope, receive, send)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope.get("method", ""), handler, status, time.monotonic() - start)


def _auth_dependency(api_key: str | None) -> Any:
    expected = api_key.encode() if api_key else None

    async def require_api_key(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                status_code=401,
                code="invalid_api_key",
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError("Incorrect API key provided.", status_code=401, code="invalid_api_key")

    return require_api_key


def _engines_by_name(
    models: Mapping[str, EngineClient] | EngineClient, served_model_name: str | None
) -> dict[str, EngineClient]:
    if isinstance(models, Mapping):
        if served_model_name is not None:
            raise TypeError("served_model_name is for a single engine; a mapping names its models itself")
        return dict(models)
    if served_model_name is None:
        raise TypeError("a single engine needs its served_model_name")
    return {served_model_name: models}


def build_app(
    models: Mapping[str, EngineClient] | EngineClient,
    served_model_name: str | None = None,
    api_key: str | None = None,
    *,
    platform: PlatformView | None = None,
    contexts: ContextRegistry | None = None,
) -> FastAPI:
    """The app serving `models` (served name -> engine, the first the default for bodies without `model`),
    or one engine as `served_model_name`; `/v1/*` and the admin routes need `api_key` when one is set.
    `platform` (the job executor) answers the admin routes `/v1/jobs/{id}` and `/v1/cluster`; `contexts`
    replaces the in-memory context registry (job executors share one in SQLite)."""
    registry = contexts if contexts is not None else ContextRegistry()
    served = ServedModels(_engines_by_name(models, served_model_name), registry, api_key)
    metrics = HTTPMetrics(served.engines)
    app = FastAPI(title="DeepFlow", version=__version__)
    app.state.server = served
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    auth = Depends(_auth_dependency(api_key))
    v1 = APIRouter(prefix="/v1", dependencies=[auth])

    def model_card(state: ServerState) -> ModelCard:
        return ModelCard(
            id=state.served_model_name,
            created=state.created,
            root=str(state.engine.model_path),
            max_model_len=state.max_model_len,
        )

    @v1.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[model_card(state) for state in served]).model_dump(mode="json"))

    @v1.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> JSONResponse:
        return JSONResponse(model_card(served.get(model_id)).model_dump(mode="json"))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(served, await parse_body(request, CompletionRequest), request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(served, await parse_body(request, ChatCompletionRequest), request)

    @v1.post("/contexts")
    async def contexts_create(request: Request) -> JSONResponse:
        return await create_context(served, await parse_body(request, ContextCreateRequest))

    @v1.get("/contexts/{context_id}")
    async def contexts_retrieve(context_id: str) -> JSONResponse:
        return retrieve_context(served, context_id)

    @v1.delete("/contexts/{context_id}")
    async def contexts_delete(context_id: str) -> JSONResponse:
        return await delete_context(served, context_id)

    # Admin, under /v1 for the key: job records name tenants' requests, and the cluster view its machines.
    @v1.get("/jobs/{job_id}")
    async def job(job_id: str) -> JSONResponse:
        record = platform.job(job_id) if platform is not None else None
        if record is None:
            raise job_not_found(job_id)
        return JSONResponse(record)

    @v1.get("/cluster")
    async def cluster() -> JSONResponse:
        if platform is None:
            raise platform_unavailable("this server runs no job executor platform")
        try:
            view = await platform.cluster()
        except (TimeoutError, ConnectionError) as exc:
            detail = str(exc) or f"the cluster manager did not answer ({type(exc).__name__})"
            raise platform_unavailable(detail) from exc
        return JSONResponse(view)

    @v1.post("/cluster/scale")
    async def cluster_scale(request: Request) -> JSONResponse:
        body = await parse_body(request, ScaleRequest)
        if platform is None:
            raise platform_unavailable("this server runs no job executor platform")
        try:
            view = await platform.scale(body.model, body.tes)
        except ValueError as exc:
            raise invalid(str(exc), param="model" if "model" in str(exc) else "tes") from exc
        except (TimeoutError, ConnectionError) as exc:
            raise platform_unavailable(str(exc) or type(exc).__name__) from exc
        return JSONResponse(view)

    app.include_router(v1)

    # Admin: dropping the cache changes every tenant's latency, so it needs the key like /v1 does.
    @app.post("/reset_prefix_cache", dependencies=[auth])
    async def reset_prefix_cache() -> JSONResponse:
        for state in served:  # all or nothing: refuse before resetting any when one engine is down
            state.check_alive()
        results = [await state.engine.reset_prefix_cache() for state in served]
        return JSONResponse({"reset": all(results)})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await parse_body(request, TokenizeRequest)
        state = served.get(body.model)
        if body.messages is not None:
            check_messages(body.messages)
            add_generation_prompt = True if body.add_generation_prompt is None else body.add_generation_prompt
            tokens = await encode_chat(
                state, body.messages, add_generation_prompt, bool(body.add_special_tokens)
            )
        else:
            if body.add_generation_prompt is not None:
                raise invalid(
                    "'add_generation_prompt' applies to 'messages' only", param="add_generation_prompt"
                )
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = await state.encode(body.prompt or "", add_special_tokens=add_special)
        out = TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=state.max_model_len)
        return JSONResponse(out.model_dump())

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await parse_body(request, DetokenizeRequest)
        state = served.get(body.model)
        state.check_token_ids(body.tokens, "tokens")
        text = state.tokenizer.decode(body.tokens, skip_special_tokens=False)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.get("/health")
    async def health() -> JSONResponse:
        for state in served:
            if not engine_alive(state.engine):
                raise engine_dead(model=state.served_model_name)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
