"""The files of the OpenAI files API (`/v1/files`): uploads for fine-tuning and batch, and job outputs.

Metadata in SQLite, content as one file per id under `<home>/files/` (written to a temporary name, fsynced
and renamed: a crash never leaves a half file under a real id). Every file belongs to a tenant ("" when no
tenants are configured): a lookup with another tenant's id answers as if the file did not exist. Sizes are
bounded at upload (`max_bytes`), JSONL purposes are checked to be UTF-8 JSON objects line by line with the
line numbers of what is wrong.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path

import msgspec

__all__ = ["FileObject", "FilePurpose", "FileStore", "FileTooLarge", "NoSuchFile", "jsonl_errors"]


class FilePurpose(StrEnum):
    FINE_TUNE = "fine-tune"
    BATCH = "batch"
    FINE_TUNE_RESULTS = "fine-tune-results"  # written by the platform
    BATCH_OUTPUT = "batch_output"  # written by the platform
    USER_DATA = "user_data"

    @property
    def uploadable(self) -> bool:
        return self in (FilePurpose.FINE_TUNE, FilePurpose.BATCH, FilePurpose.USER_DATA)


class FileObject(msgspec.Struct, kw_only=True):
    """OpenAI's file object."""

    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"


class NoSuchFile(KeyError):
    pass


class FileTooLarge(ValueError):
    pass


def jsonl_errors(data: bytes, limit: int = 20) -> list[str]:
    """Lines that are not UTF-8 JSON objects, as "line N: reason" (at most `limit`); [] when all are."""
    errors: list[str] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            errors.append(f"line {n}: not UTF-8")
        except (json.JSONDecodeError, RecursionError) as exc:
            errors.append(f"line {n}: not valid JSON ({exc})")
        else:
            if not isinstance(obj, dict):
                errors.append(f"line {n}: not a JSON object")
        if len(errors) >= limit:
            break
    return errors


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_tenant ON files(tenant, created_at);
"""


class FileStore:
    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        max_bytes: int = 512 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dir = Path(home) / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._clock = clock
        self._db = sqlite3.connect(self.dir / "files.sqlite", timeout=10.0, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def create(self, data: bytes, filename: str, purpose: FilePurpose | str, tenant: str = "") -> FileObject:
        purpose = FilePurpose(purpose)
        if len(data) > self.max_bytes:
            raise FileTooLarge(f"the file has {len(data)} bytes; the limit is {self.max_bytes}")
        file_id = f"file-{secrets.token_hex(12)}"
        path = self.dir / file_id
        tmp = self.dir / f".tmp-{file_id}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        obj = FileObject(id=file_id, bytes=len(data), created_at=int(self._clock()), filename=filename,
                         purpose=purpose.value)  # fmt: skip
        self._db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
            (obj.id, tenant, obj.filename, obj.purpose, obj.bytes, obj.created_at),
        )
        return obj

    def get(self, file_id: str, tenant: str = "") -> FileObject:
        row = self._db.execute(
            "SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ? AND tenant = ?",
            (file_id, tenant),
        ).fetchone()
        if row is None:
            raise NoSuchFile(file_id)
        return FileObject(id=row[0], filename=row[1], purpose=row[2], bytes=row[3], created_at=row[4])

    def content(self, file_id: str, tenant: str = "") -> bytes:
        self.get(file_id, tenant)
        return (self.dir / file_id).read_bytes()

    def path(self, file_id: str, tenant: str = "") -> Path:
        self.get(file_id, tenant)
        return self.dir / file_id

    def list(self, tenant: str = "", purpose: str | None = None, limit: int = 10_000) -> list[FileObject]:
        query = "SELECT id, filename, purpose, bytes, created_at FROM files WHERE tenant = ?"
        args: list[object] = [tenant]
        if purpose is not None:
            query += " AND purpose = ?"
            args.append(purpose)
        query += " ORDER BY created_at DESC, id LIMIT ?"
        args.append(limit)
        rows: Iterable[tuple] = self._db.execute(query, args).fetchall()
        return [FileObject(id=r[0], filename=r[1], purpose=r[2], bytes=r[3], created_at=r[4]) for r in rows]

    def delete(self, file_id: str, tenant: str = "") -> None:
        self.get(file_id, tenant)
        self._db.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        (self.dir / file_id).unlink(missing_ok=True)
