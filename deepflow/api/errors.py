"""OpenAI-style errors: every failure leaves the server as `{"error": {message, type, param, code}}`.

Clients written against OpenAI (the official SDKs, LangChain, ...) parse that body to raise typed exceptions,
so nothing may fall through to FastAPI's default `{"detail": ...}` shape. Validation failures are 400, as
OpenAI returns them, not FastAPI's 422.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepflow.engine.async_llm import EngineDeadError

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
RATE_LIMIT = "rate_limit_error"


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raised anywhere in a handler."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error, the answer to most bad requests."""
    return APIError(message, param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    """A known OpenAI parameter that DeepFlow cannot honour: refused, never silently ignored."""
    suffix = f" ({detail})" if detail else ""
    return APIError(
        f"'{param}' is not supported by this server{suffix}.", param=param, code="unsupported_parameter"
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        f"The model '{model}' does not exist or you do not have access to it.",
        status_code=404,
        param="model",
        code="model_not_found",
    )


def context_not_found(context_id: str) -> APIError:
    return APIError(
        f"No context with id '{context_id}' exists: it was never created, was deleted, or has expired.",
        status_code=404,
        param="context_id",
        code="context_not_found",
    )


def engine_dead(exc: BaseException | None = None, model: str | None = None) -> APIError:
    """503 engine_dead; naming the model tells which engine is down when the app serves several."""
    detail = f": {exc}" if exc is not None and str(exc) else ""
    of_model = f" of model '{model}'" if model is not None else ""
    return APIError(
        f"The inference engine{of_model} is not running{detail}",
        status_code=503,
        type=UNAVAILABLE,
        code="engine_dead",
    )


def job_not_found(job_id: str) -> APIError:
    return APIError(
        f"No job with id '{job_id}' is known to this server.",
        status_code=404,
        param="job_id",
        code="job_not_found",
    )


def platform_unavailable(detail: str) -> APIError:
    return APIError(
        f"The cluster state is unavailable: {detail}",
        status_code=503,
        type=UNAVAILABLE,
        code="platform_unavailable",
    )


def internal_error(exc: BaseException) -> APIError:
    return APIError(f"Internal server error: {type(exc).__name__}: {exc}", status_code=500, type=SERVER_ERROR)


def _is_union_tag(part: str) -> bool:
    """pydantic adds the union member it tried to `loc` ('str', 'list[int]', 'StreamOptions', ...)."""
    return part[:1].isupper() or any(c in part for c in "[]-()") or part in {"str", "int", "float", "bool"}


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', the way OpenAI names nested parameters."""
    out = ""
    for part in loc:
        if isinstance(part, str) and _is_union_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first problem of a pydantic error, worded like OpenAI's; unknown fields are reported first."""
    errors = list(exc.errors())
    if not errors:
        return invalid("Invalid request.")
    errors.sort(key=lambda e: e.get("type") != "extra_forbidden")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if loc[:1] in (("header",), ("query",), ("path",)):
        param: str | None = str(loc[-1])  # a header's name as sent ('x-cache-salt'), no union tags to drop
    else:
        param = _loc_to_param(tuple(p for p in loc if p != "body")) or None
    if first.get("type") == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param=param)
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if param is None:
        return invalid(message)
    return invalid(f"Invalid value for '{param}': {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type that can reach Starlette to the OpenAI error shape."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
            err = APIError(message, status_code=404, type=INVALID_REQUEST, code="unknown_url")
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
            err = APIError(message, status_code=405, type=INVALID_REQUEST, code="method_not_allowed")
        else:
            kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
            err = APIError(str(exc.detail), status_code=exc.status_code, type=kind)
        return err.response(headers=dict(exc.headers) if exc.headers else None)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return from_validation_error(exc).response()

    async def on_engine_dead(request: Request, exc: Exception) -> JSONResponse:
        return engine_dead(exc).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ValidationError, on_validation_error)
    app.add_exception_handler(EngineDeadError, on_engine_dead)
    app.add_exception_handler(Exception, on_unexpected)
