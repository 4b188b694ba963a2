"""Request bodies, from bytes on the wire to a validated pydantic model, with every failure a 4xx.

One generic pass closes whole classes of malformed input instead of special cases per field: the size is
capped before anything is read into memory past the cap (413), and the parsed JSON is walked once so that
no value can reach a model, the tokenizer or msgspec's encoder that they cannot represent — integers outside
int64, non-finite floats (`NaN`/`Infinity` literals, `1e999`), strings with lone UTF-16 surrogates (which
cannot be encoded as UTF-8), and nesting deeper than any body of ours. Big bodies are parsed in a thread.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from deepflow.api.errors import APIError, from_validation_error, invalid
from deepflow.api.limits import INT64_MAX, INT64_MIN, MAX_JSON_DEPTH, OFFLOAD_BYTES

M = TypeVar("M", bound=BaseModel)


def too_large(limit: int) -> APIError:
    return APIError(
        f"The request body is larger than this server's limit of {limit} bytes (--max-body-size).",
        status_code=413,
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with a 413 as soon as it is known to exceed `limit`: from Content-Length before
    reading anything, else (chunked uploads) by counting bytes as they arrive."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise invalid("The client closed the connection before sending the whole body.") from None
    return b"".join(chunks)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a valid JSON number")


def _bad_value(path: str, problem: str) -> APIError:
    param = path or None
    return invalid(f"Invalid value for '{path}': {problem}" if path else problem, param=param)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check_string(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_value(path, "the string contains a lone UTF-16 surrogate (not valid Unicode)") from None


def check_json_values(data: Any) -> None:
    """Walk parsed JSON (iteratively: depth is what is being checked) and refuse what no field can take."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise _bad_value(path, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_string(key, path)
                    stack.append((item, _join(path, key), depth + 1))
            else:
                stack.extend((item, _join(path, i), depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise _bad_value(path, "integers must fit in 64 bits")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _bad_value(path, "numbers must be finite")


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise invalid(f"The body nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, ints past 4,300 digits, NaN
        raise invalid(
            f"We could not parse the JSON body of your request ({exc}). The API expects a JSON object "
            "sent with Content-Type: application/json."
        ) from None
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object, not {type(data).__name__}.")
    check_json_values(data)
    return data


def validate_body(raw: bytes, model: type[M]) -> M:
    data = decode_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    raw = await read_body(request, limit)
    if len(raw) > OFFLOAD_BYTES:
        return await asyncio.to_thread(validate_body, raw, model)
    return validate_body(raw, model)
