"""The cluster manager's durable state: one SQLite file in the run folder.

It holds what a restarted manager needs to adopt the running processes instead of starting new ones: every
TE's id, model, role, incarnation, pid, address and state, and the job executors seen. Live numbers (load, KV
usage) are not persisted; TE heartbeats bring them back within a second.
"""

from __future__ import annotations

import sqlite3
import time
from enum import StrEnum
from pathlib import Path

import msgspec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tes (
    te_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'colocated',
    incarnation INTEGER NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    address TEXT NOT NULL,
    restarts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    ready_at REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jes (
    je_id TEXT PRIMARY KEY,
    pid INTEGER,
    last_seen REAL NOT NULL
);
"""


class TEStatus(StrEnum):
    """A TE's state in the cluster manager (stored and pushed to the JEs by value)."""

    STARTING = "starting"  # spawned (or adopted), no heartbeat yet
    READY = "ready"  # serving
    DRAINING = "draining"  # scaled down: finishes its requests, gets no new ones, then stops
    DEAD = "dead"  # exited or hung: restarted under a new incarnation after a backoff
    REMOVED = "removed"  # scaled away
    STOPPED = "stopped"  # the manager stopped it on shutdown


class TERow(msgspec.Struct, kw_only=True):
    te_id: str
    model: str
    incarnation: int
    state: TEStatus
    pid: int | None
    address: str
    restarts: int = 0
    role: str = "colocated"  # its group's TERole
    started_at: float | None = None
    ready_at: float | None = None


class Registry:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write is durable at once
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def tes(self) -> list[TERow]:
        cursor = self._db.execute(
            "SELECT te_id, model, incarnation, state, pid, address, restarts, started_at, ready_at, role"
            " FROM tes"
        )
        return [
            TERow(
                te_id=r[0],
                model=r[1],
                incarnation=r[2],
                state=TEStatus(r[3]),
                pid=r[4],
                address=r[5],
                restarts=r[6],
                started_at=r[7],
                ready_at=r[8],
                role=r[9],
            )
            for r in cursor.fetchall()
        ]

    def save_te(self, row: TERow) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tes (te_id, model, incarnation, state, pid, address, restarts,"
            " started_at, ready_at, updated_at, role) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.te_id,
                row.model,
                row.incarnation,
                row.state,
                row.pid,
                row.address,
                row.restarts,
                row.started_at,
                row.ready_at,
                time.time(),
                row.role,
            ),
        )

    def save_je(self, je_id: str, pid: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO jes (je_id, pid, last_seen) VALUES (?, ?, ?)", (je_id, pid, time.time())
        )

    def close(self) -> None:
        self._db.close()
