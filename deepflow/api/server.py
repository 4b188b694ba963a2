"""The OpenAI-compatible HTTP app: routes, bearer auth, request ids, error shapes and metrics.

Bodies are parsed by hand (`body.parse_body`) rather than through FastAPI's model parameters so that the size
limit applies before parsing, big bodies are parsed off the event loop, and malformed JSON, unknown fields and
bad values all become OpenAI-style 400s with the offending parameter named. The OpenAPI schema still lists
every request body: `_document_bodies` adds the models FastAPI never saw.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepflow import __version__
from deepflow.api.body import parse_body
from deepflow.api.chat import create_chat_completion, encode_chat
from deepflow.api.completions import create_completion
from deepflow.api.contexts import ContextRegistry, create_context, delete_context, retrieve_context
from deepflow.api.errors import (
    APIError,
    engine_dead,
    install_error_handlers,
    internal_error,
    invalid,
    job_not_found,
    platform_unavailable,
)
from deepflow.api.fine_tuning import FineTuningService, fine_tuning_router
from deepflow.api.limits import APILimits
from deepflow.api.metrics import HTTPMetrics
from deepflow.api.protocol import (
    MAX_CACHE_SALT,
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
CACHE_SALT_HEADER = "x-cache-salt"
CacheSaltHeader = Annotated[
    str | None, Header(alias=CACHE_SALT_HEADER, min_length=1, max_length=MAX_CACHE_SALT)
]


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


# The POST routes' bodies, for the OpenAPI schema (FastAPI does not see bodies parsed by hand).
_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/contexts": ContextCreateRequest,
    "/v1/cluster/scale": ScaleRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


def _document_bodies(app: FastAPI) -> None:
    """Make `app.openapi()` list each POST route's JSON body (its model's validation schema, shared
    definitions under components) and our 400 in place of FastAPI's 422."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build_schema()
        refs, defs = models_json_schema(
            [(model, "validation") for model in _BODIES.values()], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        for path, model in _BODIES.items():
            operation = schema["paths"][path]["post"]
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(model, "validation")]}},
            }
            operation["responses"]["400"] = {"description": "Invalid request (an OpenAI error body)"}
            operation["responses"]["413"] = {"description": "Body over the size limit (an OpenAI error body)"}
        for operations in schema["paths"].values():  # bad headers or path parameters are 400s too
            for operation in operations.values():
                if operation["responses"].pop("422", None) is not None:
                    operation["responses"]["400"] = {"description": "Invalid request (an OpenAI error body)"}
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(
    models: Mapping[str, EngineClient] | EngineClient,
    served_model_name: str | None = None,
    api_key: str | None = None,
    *,
    platform: PlatformView | None = None,
    contexts: ContextRegistry | None = None,
    limits: APILimits | None = None,
    fine_tuning: FineTuningService | None = None,
) -> FastAPI:
    """The app serving `models` (served name -> engine, the first the default for bodies without `model`),
    or one engine as `served_model_name`; every route but `/health` needs `api_key` when one is set
    (`/metrics` too unless `limits.metrics_public`). `platform` (the job executor) answers the admin routes
    `/v1/jobs/{id}` and `/v1/cluster`; `contexts` replaces the in-memory context registry (job executors
    share one in SQLite). `limits` defaults to the platform spec's (`platform.spec.api`), else the
    defaults."""
    if limits is None:
        limits = getattr(getattr(platform, "spec", None), "api", None) or APILimits()
    registry = contexts if contexts is not None else ContextRegistry()
    served = ServedModels(_engines_by_name(models, served_model_name), registry, api_key, limits)
    metrics = HTTPMetrics(served.engines)
    # Our own /openapi.json below, behind the key. No /docs: Swagger UI cannot send the key (and loads its
    # scripts from a CDN).
    app = FastAPI(title="DeepFlow", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = served
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    auth = Depends(_auth_dependency(api_key))
    v1 = APIRouter(prefix="/v1", dependencies=[auth])
    # Every route but /health needs the key: even /tokenize costs CPU, and a model's metrics tell one
    # tenant about another's traffic and prefix-cache hits.
    keyed = APIRouter(dependencies=[auth])

    async def body_of(request: Request, model: type[M]) -> M:
        return await parse_body(request, model, limits.max_body_bytes)

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
        return await create_completion(served, await body_of(request, CompletionRequest), request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(served, await body_of(request, ChatCompletionRequest), request)

    @v1.post("/contexts")
    async def contexts_create(request: Request) -> JSONResponse:
        return await create_context(served, await body_of(request, ContextCreateRequest))

    # A context is bound to the salt it was made under; GET and DELETE, which have no body, carry the salt
    # in a header (not the query string, which access logs record).
    @v1.get("/contexts/{context_id}")
    async def contexts_retrieve(context_id: str, salt: CacheSaltHeader = None) -> JSONResponse:
        return retrieve_context(served, context_id, salt)

    @v1.delete("/contexts/{context_id}")
    async def contexts_delete(context_id: str, salt: CacheSaltHeader = None) -> JSONResponse:
        return await delete_context(served, context_id, salt)

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
        body = await body_of(request, ScaleRequest)
        if platform is None:
            raise platform_unavailable("this server runs no job executor platform")
        try:
            view = await platform.scale(body.model, body.tes, body.role)
        except ValueError as exc:
            text = str(exc)
            param = "role" if "role" in text else "model" if "unknown model" in text else "tes"
            raise invalid(text, param=param) from exc
        except (TimeoutError, ConnectionError) as exc:
            raise platform_unavailable(str(exc) or type(exc).__name__) from exc
        return JSONResponse(view)

    if fine_tuning is not None:  # /v1/files and /v1/fine_tuning/jobs, with their worker manager
        v1.include_router(fine_tuning_router(fine_tuning, served, limits.max_body_bytes))
        app.router.add_event_handler("startup", fine_tuning.start)
        app.router.add_event_handler("shutdown", fine_tuning.stop)

    app.include_router(v1)

    # Admin: dropping the cache changes every tenant's latency, so it needs the key like /v1 does.
    @app.post("/reset_prefix_cache", dependencies=[auth])
    async def reset_prefix_cache() -> JSONResponse:
        for state in served:  # all or nothing: refuse before resetting any when one engine is down
            state.check_alive()
        results = [await state.engine.reset_prefix_cache() for state in served]
        return JSONResponse({"reset": all(results)})

    @keyed.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await body_of(request, TokenizeRequest)
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

    @keyed.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await body_of(request, DetokenizeRequest)
        state = served.get(body.model)
        state.check_token_ids(body.tokens, "tokens")
        text = await state.decode(body.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    @app.get("/health")
    async def health() -> JSONResponse:
        for state in served:
            if not engine_alive(state.engine):
                raise engine_dead(model=state.served_model_name)
        return JSONResponse({"status": "ok"})

    @keyed.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @keyed.get("/openapi.json", include_in_schema=False)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    metrics_router = app if limits.metrics_public else keyed

    @metrics_router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(keyed)
    _document_bodies(app)
    return app
