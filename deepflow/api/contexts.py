"""Explicit context caching over HTTP: `POST/GET/DELETE /v1/contexts` and the registry behind them.

The engine pins a context's KV blocks; this layer remembers what the context *was* (its token ids, and its
chat messages when it was made from messages) so that a later request naming it can be turned into the full
prompt, context first. The engine only sees that full prompt plus the id, and reuses the pinned blocks for
whatever prefix matches.
"""

from __future__ import annotations

import dataclasses
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
    expires_at: float  # unix seconds, as the engine reported it (it unpins the blocks then)

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
        """A generation request's (context, cache salt): the salt defaults to the context's and may not
        differ from it, since blocks cached under one salt are invisible to requests under another."""
        if context_id is None:
            return None, cache_salt
        context = self.get(context_id)
        if context.model != model:
            message = f"Context '{context_id}' belongs to model '{context.model}', not '{model}'."
            raise invalid(message, param="context_id")
        if cache_salt is not None and cache_salt != context.cache_salt:
            raise invalid(
                f"'cache_salt' differs from the salt context '{context_id}' was created with; omit it to use "
                "the context's.",
                param="cache_salt",
            )
        return context, context.cache_salt


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
    created = int(state.contexts.clock())
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
        expires_at=info.expires_at,
    )
    state.contexts.add(context)
    return JSONResponse(context.to_object().model_dump())


def retrieve_context(models: ServedModels, context_id: str) -> JSONResponse:
    return JSONResponse(models.contexts.get(context_id).to_object().model_dump())


async def delete_context(models: ServedModels, context_id: str) -> JSONResponse:
    context = models.contexts.pop(context_id)
    # The blocks are pinned on the engine of the model that made the context.
    owner = models.states.get(context.model)
    if owner is not None:
        # False: the engine had already let it go (its TTL ran out a moment earlier); deleted all the same.
        await owner.engine.delete_context(context_id)
    return JSONResponse(ContextDeleted(id=context_id).model_dump())
