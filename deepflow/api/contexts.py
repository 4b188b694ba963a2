"""Explicit context caching over HTTP: `POST/GET/DELETE /v1/contexts` and the registry behind them.

The engine pins a context's KV blocks; this layer remembers what the context *was* (its token ids, and its
chat messages when it was made from messages) so that a later request naming it can be turned into the full
prompt, context first. The engine only sees that full prompt plus the id, and reuses the pinned blocks for
whatever prefix matches.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from deepflow.api.chat import encode_chat
from deepflow.api.errors import RATE_LIMIT, APIError, context_not_found, engine_dead, invalid
from deepflow.api.protocol import ChatMessage, ContextCreateRequest, ContextDeleted, ContextObject
from deepflow.api.state import new_id
from deepflow.engine.async_llm import EngineDeadError
from deepflow.engine.contexts import ContextLimitError

if TYPE_CHECKING:
    from deepflow.api.state import ServedModels, ServerState


@dataclass(frozen=True)
class Context:
    id: str
    model: str
    token_ids: list[int]
    messages: list[ChatMessage] | None  # set when made from messages: requests re-render the whole chat
    prompt: str | list[int] | None  # set when made from a prompt: requests append to `token_ids`
    cache_salt: str | None
    created: int
    expires_at: float  # unix seconds: creation + TTL (the engine unpins the blocks a prefill later)

    def to_object(self) -> ContextObject:
        return ContextObject(
            id=self.id,
            model=self.model,
            tokens=len(self.token_ids),
            created=self.created,
            expires_at=int(self.expires_at),
        )


class ContextRegistry:
    """id -> Context. An expired entry is answered as unknown and dropped; `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._contexts: dict[str, Context] = {}
        # context id -> the TE that pins it now, or None (set by the platform's job executor)
        self.locator: Callable[[str], str | None] | None = None

    def body(self, context: Context) -> dict[str, object]:
        """The context object; with a platform also `te`: the TE that pins it now, None while none does
        (its TE was drained or died: the next request that uses it pins it again)."""
        out: dict[str, object] = context.to_object().model_dump()
        if self.locator is not None:
            out["te"] = self.locator(context.id)
        return out

    def __len__(self) -> int:
        self.prune()
        return len(self._contexts)

    def add(self, context: Context) -> None:
        self.prune()  # creation is the one place that grows the registry, so expired entries go here
        self._contexts[context.id] = context

    def get(self, context_id: str) -> Context:
        """The live context, or a 404."""
        context = self._contexts.get(context_id)
        if context is not None and context.expires_at <= self.clock():
            del self._contexts[context_id]
            context = None
        if context is None:
            raise context_not_found(context_id)
        return context

    def pop(self, context_id: str) -> Context:
        context = self.get(context_id)
        del self._contexts[context_id]
        return context

    def prune(self) -> None:
        now = self.clock()
        for context_id in [k for k, c in self._contexts.items() if c.expires_at <= now]:
            del self._contexts[context_id]

    def resolve(
        self, context_id: str | None, cache_salt: str | None, model: str
    ) -> tuple[Context | None, str | None]:
        """A generation request's (context, cache salt): the context must have been made under the
        request's salt (see `lookup`)."""
        if context_id is None:
            return None, cache_salt
        context = self.lookup(context_id, cache_salt)
        if context.model != model:
            message = f"Context '{context_id}' belongs to model '{context.model}', not '{model}'."
            raise invalid(message, param="context_id")
        return context, context.cache_salt

    def lookup(self, context_id: str, cache_salt: str | None) -> Context:
        """The live context made under `cache_salt`, or the 404 of an unknown id. A context id alone is no
        bearer token: a client of another tenant (another salt, or none) cannot tell it exists, let alone
        use or delete it. Compared in constant time, as the salt is the tenant's secret."""
        context = self.get(context_id)
        if not _same_salt(context.cache_salt, cache_salt):
            raise context_not_found(context_id)
        return context


def _same_salt(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a.encode(), b.encode())


class SQLiteContextRegistry(ContextRegistry):
    """The registry in a SQLite file that several job executors share (they share the port, so a context
    made through one is named in requests reaching another), and that outlives a restarted one."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS contexts"
            " (id TEXT PRIMARY KEY, expires_at REAL NOT NULL, body TEXT NOT NULL)"
        )

    def __len__(self) -> int:
        self.prune()
        return int(self._db.execute("SELECT COUNT(*) FROM contexts").fetchone()[0])

    def add(self, context: Context) -> None:
        self.prune()
        body = {
            **dataclasses.asdict(context),
            "messages": None if context.messages is None else [m.model_dump() for m in context.messages],
        }
        self._db.execute(
            "INSERT OR REPLACE INTO contexts VALUES (?, ?, ?)",
            (context.id, context.expires_at, json.dumps(body)),
        )

    def get(self, context_id: str) -> Context:
        row = self._db.execute(
            "SELECT body FROM contexts WHERE id = ? AND expires_at > ?", (context_id, self.clock())
        ).fetchone()
        if row is None:
            raise context_not_found(context_id)
        body = json.loads(row[0])
        messages = body.pop("messages")
        return Context(
            **body, messages=None if messages is None else [ChatMessage.model_validate(m) for m in messages]
        )

    def pop(self, context_id: str) -> Context:
        context = self.get(context_id)
        self._db.execute("DELETE FROM contexts WHERE id = ?", (context_id,))
        return context

    def prune(self) -> None:
        self._db.execute("DELETE FROM contexts WHERE expires_at <= ?", (self.clock(),))


async def _context_tokens(state: ServerState, body: ContextCreateRequest) -> tuple[list[int], str]:
    """The context's prompt and the parameter it came from. Messages are rendered without the generation
    prompt: requests continue the conversation, so the assistant header belongs to them."""
    if body.messages is not None:
        return await encode_chat(state, body.messages, add_generation_prompt=False), "messages"
    if isinstance(body.prompt, str):
        return await state.encode(body.prompt), "prompt"
    assert body.prompt is not None
    state.check_token_ids(body.prompt, "prompt")
    return list(body.prompt), "prompt"


async def create_context(models: ServedModels, body: ContextCreateRequest) -> JSONResponse:
    """Pin the context on the engine of the body's model; it belongs to that model from then on."""
    body.check_supported()
    state = models.get(body.model)
    token_ids, param = await _context_tokens(state, body)
    state.check_context(len(token_ids), None, param)  # a context must leave room for a request's tokens
    state.check_alive()
    # One clock reading for both: expires_at - created is exactly the TTL. The registry forgets the context
    # then, at most the prefill's duration before the engine unpins it (its clock starts after the prefill).
    now = state.contexts.clock()
    created = int(now)
    try:
        info = await state.engine.create_context(
            token_ids, ttl_seconds=body.ttl, context_id=new_id("ctx"), cache_salt=body.cache_salt
        )
    except ContextLimitError as exc:  # before ValueError: it is one
        raise APIError(
            f"The context cannot be pinned: {exc}.",
            status_code=429,
            type=RATE_LIMIT,
            param=param,
            code="context_limit_exceeded",
        ) from exc
    except EngineDeadError as exc:
        raise engine_dead(exc) from exc
    except ValueError as exc:
        raise invalid(str(exc), param=param) from exc
    context = Context(
        id=info.context_id,
        model=state.served_model_name,
        token_ids=token_ids,
        messages=body.messages,
        prompt=body.prompt,
        cache_salt=body.cache_salt,
        created=created,
        expires_at=now + body.ttl,
    )
    state.contexts.add(context)
    return JSONResponse(state.contexts.body(context))


def retrieve_context(models: ServedModels, context_id: str, cache_salt: str | None) -> JSONResponse:
    return JSONResponse(models.contexts.body(models.contexts.lookup(context_id, cache_salt)))


async def delete_context(models: ServedModels, context_id: str, cache_salt: str | None) -> JSONResponse:
    models.contexts.lookup(context_id, cache_salt)  # another tenant's context is unknown to this one
    context = models.contexts.pop(context_id)
    # The blocks are pinned on the engine of the model that made the context.
    owner = models.states.get(context.model)
    if owner is not None:
        # False: the engine had already let it go (its TTL ran out a moment earlier); deleted all the same.
        await owner.engine.delete_context(context_id)
    return JSONResponse(ContextDeleted(id=context_id).model_dump())
