"""Job records shared by the job executors of a cluster: one SQLite file in the run folder.

A JE keeps its live jobs in memory (`JobTracker`) and writes the ones that changed here every 100 ms, in one
transaction. `GET /v1/jobs/{id}` may land on any JE (they share the port), and a restarted JE has lost its
memory, so a lookup falls back to this file. WAL mode lets readers and the writers of several JEs overlap.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    je_id TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_updated ON jobs (updated_at);
"""


class JobStore:
    def __init__(self, path: Path, retention_seconds: float = 3600.0) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # records for inspection: no fsync per flush
        self._db.executescript(_SCHEMA)
        self.retention_seconds = retention_seconds
        self._last_prune = time.monotonic()

    def save(self, je_id: str, jobs: list[dict[str, Any]]) -> None:
        if not jobs:
            return
        now = time.time()
        rows = [(job["job_id"], je_id, job["state"], now, json.dumps(job)) for job in jobs]
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)", rows)
        if time.monotonic() - self._last_prune > 60:
            self._last_prune = time.monotonic()
            self._db.execute("DELETE FROM jobs WHERE updated_at < ?", (now - self.retention_seconds,))

    def load(self, job_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self._db.close()
