"""Where each pinned context lives, shared by the job executors (one SQLite file in the run folder).

A context's KV is pinned on one TE. That TE can go (a scale-down drains it, a crash kills it, a restart
brings it back empty under a new incarnation); the context itself (its tokens, salt and expiry) stays here.
The first request that uses a context no live TE pins re-creates it on the TE it is routed to
(`RoutingCoreClient`): recompute on use. Each row: the context's tokens, salt, expiry, and the TE id and
incarnation that pin it (None while none does).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import msgspec


class ContextRecord(msgspec.Struct, kw_only=True):
    context_id: str
    token_ids: list[int]
    cache_salt: str
    expires_at: float  # unix seconds
    te_id: str | None = None  # the TE that pins it (or is pinning it now)
    incarnation: int | None = None


class ContextStore:
    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS contexts (id TEXT PRIMARY KEY, expires_at REAL NOT NULL,"
            " cache_salt TEXT NOT NULL, token_ids TEXT NOT NULL, te_id TEXT, incarnation INTEGER)"
        )

    def save(self, record: ContextRecord) -> None:
        self._db.execute("DELETE FROM contexts WHERE expires_at <= ?", (self.clock(),))
        self._db.execute(
            "INSERT OR REPLACE INTO contexts VALUES (?, ?, ?, ?, ?, ?)",
            (record.context_id, record.expires_at, record.cache_salt, json.dumps(record.token_ids),
             record.te_id, record.incarnation),
        )  # fmt: skip

    def get(self, context_id: str) -> ContextRecord | None:
        """The live (unexpired) context, or None."""
        row = self._db.execute(
            "SELECT expires_at, cache_salt, token_ids, te_id, incarnation FROM contexts"
            " WHERE id = ? AND expires_at > ?",
            (context_id, self.clock()),
        ).fetchone()
        if row is None:
            return None
        return ContextRecord(
            context_id=context_id,
            expires_at=row[0],
            cache_salt=row[1],
            token_ids=json.loads(row[2]),
            te_id=row[3],
            incarnation=row[4],
        )

    def locate(self, context_id: str, te_id: str | None, incarnation: int | None) -> None:
        self._db.execute(
            "UPDATE contexts SET te_id = ?, incarnation = ? WHERE id = ?", (te_id, incarnation, context_id)
        )

    def delete(self, context_id: str) -> None:
        self._db.execute("DELETE FROM contexts WHERE id = ?", (context_id,))

    def close(self) -> None:
        self._db.close()
