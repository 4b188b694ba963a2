"""Tenants and their API keys in SQLite (under `$DEEPFLOW_HOME`, shared by every JE of a host).

Keys are random (`df-` + 32 bytes, URL-safe) and stored only as their SHA-256: a leaked database gives no
usable key, and a lookup is one indexed equality on the hash (keys carry 256 bits, so a slow password hash
would buy nothing). The key itself is shown once, when it is created or rotated. A revoked tenant's keys
stop at once; rotating replaces every key of the tenant with one new key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from deepflow.tenants.model import SLOClass, Tenant, TenantLimits

__all__ = ["TenantExists", "TenantNotFound", "TenantStore", "default_tenants_path", "hash_key"]

KEY_PREFIX = "df-"


class TenantNotFound(KeyError):
    pass


class TenantExists(ValueError):
    pass


def default_tenants_path() -> Path:
    from deepflow.weights.embedded import default_home

    return default_home() / "tenants.sqlite"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    slo_class TEXT NOT NULL,
    limits TEXT NOT NULL,
    models TEXT,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
    hint TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant_id);
"""


class TenantStore:
    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ---- management -----------------------------------------------------------------------------------
    def create(
        self,
        name: str,
        *,
        slo_class: SLOClass = SLOClass.STANDARD,
        limits: TenantLimits | None = None,
        models: list[str] | None = None,
        tenant_id: str | None = None,
    ) -> tuple[Tenant, str]:
        """A new tenant and its first API key (returned once; only its hash is kept)."""
        tenant = Tenant(
            tenant_id=tenant_id or f"tenant-{secrets.token_hex(6)}",
            name=name,
            slo_class=slo_class,
            limits=limits or TenantLimits(),
            models=models,
            created_at=self._clock(),
        )
        try:
            with self._tx():
                self._db.execute(
                    "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, 0)",
                    (
                        tenant.tenant_id,
                        tenant.name,
                        tenant.slo_class.value,
                        msgspec.json.encode(tenant.limits).decode(),
                        None if models is None else msgspec.json.encode(models).decode(),
                        tenant.created_at,
                    ),
                )
                key = self._add_key(tenant.tenant_id)
        except sqlite3.IntegrityError:
            raise TenantExists(f"tenant {tenant.tenant_id!r} exists") from None
        return tenant, key

    def rotate_key(self, tenant_id: str) -> str:
        """Replace every key of the tenant with one new key."""
        with self._tx():
            self._require(tenant_id)
            self._db.execute("DELETE FROM api_keys WHERE tenant_id = ?", (tenant_id,))
            return self._add_key(tenant_id)

    def revoke(self, tenant_id: str) -> None:
        """The tenant's keys stop working; its records stay (usage, jobs) for the operator."""
        with self._tx():
            self._require(tenant_id)
            self._db.execute("UPDATE tenants SET revoked = 1 WHERE tenant_id = ?", (tenant_id,))
            self._db.execute("DELETE FROM api_keys WHERE tenant_id = ?", (tenant_id,))

    def list(self) -> list[Tenant]:
        rows = self._db.execute("SELECT * FROM tenants ORDER BY created_at, tenant_id").fetchall()
        return [self._tenant(r) for r in rows]

    def get(self, tenant_id: str) -> Tenant:
        return self._require(tenant_id)

    def key_hints(self, tenant_id: str) -> list[str]:
        rows = self._db.execute("SELECT hint FROM api_keys WHERE tenant_id = ?", (tenant_id,)).fetchall()
        return [r[0] for r in rows]

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM tenants").fetchone()[0])

    # ---- the request path -----------------------------------------------------------------------------
    def authenticate(self, key: str) -> Tenant | None:
        """The live tenant the key belongs to, or None (unknown, rotated away or revoked)."""
        if not key.startswith(KEY_PREFIX):
            return None
        row = self._db.execute(
            "SELECT t.* FROM api_keys k JOIN tenants t ON t.tenant_id = k.tenant_id "
            "WHERE k.key_hash = ? AND t.revoked = 0",
            (hash_key(key),),
        ).fetchone()
        return None if row is None else self._tenant(row)

    # ---- internals ------------------------------------------------------------------------------------
    def _add_key(self, tenant_id: str) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        hint = f"{key[:6]}…{key[-4:]}"
        self._db.execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?)", (hash_key(key), tenant_id, hint, self._clock())
        )
        return key

    def _require(self, tenant_id: str) -> Tenant:
        row = self._db.execute("SELECT * FROM tenants WHERE tenant_id = ?", (tenant_id,)).fetchone()
        if row is None:
            raise TenantNotFound(tenant_id)
        return self._tenant(row)

    @staticmethod
    def _tenant(row: tuple) -> Tenant:
        tenant_id, name, slo_class, limits, models, created_at, revoked = row
        return Tenant(
            tenant_id=tenant_id,
            name=name,
            slo_class=SLOClass(slo_class),
            limits=msgspec.json.decode(limits, type=TenantLimits),
            models=None if models is None else msgspec.json.decode(models, type=list[str]),
            created_at=created_at,
            revoked=bool(revoked),
        )

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
