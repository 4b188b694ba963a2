"""Fine-tuning jobs as the paper describes them: one request becomes three jobs — preprocess, train,
evaluate — each with its own state, run in order by a worker process; all state in SQLite, so a worker
that dies is restarted and goes on (the trainer resumes from its last checkpoint).

The record a client sees is OpenAI's `fine_tuning.job` (`to_openai`); the three internal jobs, their
states and attempts are shown beside it in `/v1/jobs/{id}` (`to_platform`). States are enums; every change
is a transaction, and every change worth telling appears as a `fine_tuning.job.event`.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["FTStatus", "FineTuneJob", "FineTuneStore", "Hyperparameters", "Stage", "StageState"]


class FTStatus(StrEnum):
    """OpenAI's job statuses."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (FTStatus.SUCCEEDED, FTStatus.FAILED, FTStatus.CANCELLED)


class Stage(StrEnum):
    PREPROCESS = "preprocess"
    TRAIN = "train"
    EVALUATE = "evaluate"


class StageState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Hyperparameters(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"

    def resolved(self, num_examples: int) -> tuple[int, int, float]:
        """OpenAI's "auto" made concrete for a small CPU run: epochs by data size, batch 4, multiplier 1."""
        epochs = self.n_epochs if isinstance(self.n_epochs, int) else (3 if num_examples >= 100 else 6)
        batch = self.batch_size if isinstance(self.batch_size, int) else 4
        lr = self.learning_rate_multiplier if not isinstance(self.learning_rate_multiplier, str) else 1.0
        return epochs, batch, float(lr)


class StageRecord(msgspec.Struct, kw_only=True):
    state: StageState = StageState.PENDING
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    error: str | None = None


class FineTuneJob(msgspec.Struct, kw_only=True):
    id: str
    tenant: str = ""
    model: str  # the served base model's name
    base_model_path: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters = msgspec.field(default_factory=Hyperparameters)
    suffix: str | None = None
    seed: int = 0
    status: FTStatus = FTStatus.VALIDATING_FILES
    created_at: float
    finished_at: float | None = None
    fine_tuned_model: str | None = None
    fine_tuned_model_path: str | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    worker_pid: int | None = None  # the worker process running it (its manager's claim); -1 while starting
    worker_host: str | None = None
    worker_restarts: int = 0  # workers that ended with the job unfinished (crashed or killed)
    stages: dict[Stage, StageRecord] = msgspec.field(
        default_factory=lambda: {s: StageRecord() for s in Stage}
    )
    result_files: list[str] = msgspec.field(default_factory=list)

    def output_name(self) -> str:
        """OpenAI's shape, `ft:<base>:<suffix>:<id>`, with the base served name."""
        return f"{self.model}:ft-{self.suffix or 'model'}-{self.id.removeprefix('ftjob-')}"

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "model": self.model,
            "created_at": int(self.created_at),
            "finished_at": None if self.finished_at is None else int(self.finished_at),
            "fine_tuned_model": self.fine_tuned_model,
            "organization_id": self.tenant or "default",
            "result_files": self.result_files,
            "status": self.status.value,
            "validation_file": self.validation_file,
            "training_file": self.training_file,
            "hyperparameters": msgspec.to_builtins(self.hyperparameters),
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "seed": self.seed,
            "suffix": self.suffix,
        }

    def to_platform(self) -> dict[str, Any]:
        """The request → jobs view of `/v1/jobs/{id}`: the three internal jobs and their states."""
        return {
            "id": self.id,
            "kind": "fine_tuning",
            "status": self.status.value,
            "jobs": [
                {"job": f"{self.id}/{stage.value}", "stage": stage.value, **msgspec.to_builtins(rec)}
                for stage, rec in self.stages.items()
            ],
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at REAL NOT NULL,
                                 record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (job_id TEXT NOT NULL, seq INTEGER NOT NULL, created_at REAL NOT NULL,
                                   level TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
                                   PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS checkpoints (job_id TEXT NOT NULL, step INTEGER NOT NULL,
                                        created_at REAL NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL,
                                        PRIMARY KEY (job_id, step));
"""

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(FineTuneJob)


class NoSuchJob(KeyError):
    pass


class FineTuneStore:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def now(self) -> float:
        return self._clock()

    def create(self, **fields: Any) -> FineTuneJob:
        job = FineTuneJob(id=f"ftjob-{secrets.token_hex(10)}", created_at=self._clock(), **fields)
        self._db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?)", (job.id, job.tenant, job.created_at, _enc.encode(job))
        )
        self.event(job.id, "info", f"Created fine-tuning job: {job.id}")
        return job

    def get(self, job_id: str, tenant: str | None = None) -> FineTuneJob:
        row = self._db.execute("SELECT tenant, record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row[0] != tenant):
            raise NoSuchJob(job_id)
        return _dec.decode(row[1])

    def update(self, job_id: str, change: Callable[[FineTuneJob], None]) -> FineTuneJob:
        """Read, change and write one job in one transaction (the API and the worker both write)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NoSuchJob(job_id)
            job = _dec.decode(row[0])
            change(job)
            self._db.execute("UPDATE jobs SET record = ? WHERE id = ?", (_enc.encode(job), job_id))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return job

    def list(self, tenant: str = "", limit: int = 20, after: str | None = None) -> list[FineTuneJob]:
        rows = self._db.execute(
            "SELECT id, record FROM jobs WHERE tenant = ? ORDER BY created_at DESC, id DESC", (tenant,)
        ).fetchall()
        jobs = [_dec.decode(r[1]) for r in rows]
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit]

    def unfinished(self) -> list[FineTuneJob]:
        rows = self._db.execute("SELECT record FROM jobs ORDER BY created_at").fetchall()
        return [j for j in (_dec.decode(r[0]) for r in rows) if not j.status.terminal]

    # ---- events and checkpoints ----------------------------------------------------------------------
    def event(self, job_id: str, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            seq = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()[0]
            self._db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, seq, self._clock(), level, message, None if data is None else json.dumps(data)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def events(self, job_id: str, limit: int = 20, after: str | None = None) -> list[dict[str, Any]]:
        """Newest first, as OpenAI lists them; `after` an event id for paging."""
        after_seq = int(after.rsplit("-", 1)[1]) if after else None
        rows = self._db.execute(
            "SELECT seq, created_at, level, message, data FROM events WHERE job_id = ? "
            + ("AND seq < ? " if after_seq else "")
            + "ORDER BY seq DESC LIMIT ?",
            (job_id, after_seq, limit) if after_seq else (job_id, limit),
        ).fetchall()
        return [
            {
                "object": "fine_tuning.job.event",
                "id": f"ftevent-{job_id.removeprefix('ftjob-')}-{seq}",
                "created_at": int(at),
                "level": level,
                "message": message,
                "data": None if data is None else json.loads(data),
                "type": "metrics" if data is not None and "step" in json.loads(data) else "message",
            }
            for seq, at, level, message, data in rows
        ]

    def checkpoint(self, job_id: str, step: int, path: str, metrics: dict[str, float]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
            (job_id, step, self._clock(), path, json.dumps(metrics)),
        )

    def checkpoints(self, job_id: str, limit: int = 10) -> list[dict[str, Any]]:
        job = self.get(job_id)
        rows = self._db.execute(
            "SELECT step, created_at, path, metrics FROM checkpoints WHERE job_id = ? "
            "ORDER BY step DESC LIMIT ?",
            (job_id, limit),
        ).fetchall()
        return [
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
                "created_at": int(at),
                "fine_tuned_model_checkpoint": f"{job.output_name()}:ckpt-step-{step}",
                "fine_tuning_job_id": job_id,
                "step_number": step,
                "metrics": json.loads(metrics),
            }
            for step, at, _path, metrics in rows
        ]
