"""What a tenant is: its limits, its SLO class, the models it may use. Pure (msgspec)."""

from __future__ import annotations

import hashlib
from enum import StrEnum

import msgspec

__all__ = ["SLOClass", "Tenant", "TenantLimits", "cache_namespace"]


class SLOClass(StrEnum):
    """A tenant's service class: the scheduler priority its requests run at and the targets it is held to."""

    INTERACTIVE = "interactive"  # latency targets; runs first
    STANDARD = "standard"
    BATCH = "batch"  # best effort: fills idle capacity, yields to the others

    @property
    def priority(self) -> int:
        """The engine scheduler's priority (lower runs first; a batch request never preempts the others)."""
        return {SLOClass.INTERACTIVE: 0, SLOClass.STANDARD: 1, SLOClass.BATCH: 10}[self]


class TenantLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-tenant quotas; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + max output tokens, charged at admission
    max_concurrent_requests: int | None = None
    ttft_slo_s: float | None = None  # targets the tenant's SLO attainment is measured against
    tpot_slo_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for no limit)")
        for name in ("ttft_slo_s", "tpot_slo_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0")


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    name: str
    slo_class: SLOClass = SLOClass.STANDARD
    limits: TenantLimits = msgspec.field(default_factory=TenantLimits)
    models: list[str] | None = None  # the served model names it may use; None = all
    created_at: float = 0.0
    revoked: bool = False

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def cache_namespace(tenant_id: str, cache_salt: str = "") -> str:
    """The prefix-cache namespace of a tenant's request: derived from the tenant, so no cached KV is ever
    shared across tenants (a shared prefix cache is a timing side channel: CVE-2025-46570), and a client's
    own `cache_salt` still splits its namespace further. Hashed, so ids never reach the engine's tree."""
    # Length-prefixed: no (tenant, salt) pair can spell another's (a separator could occur in either).
    material = f"{len(tenant_id)}:{tenant_id}{cache_salt}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(material).hexdigest()[:32]
    return f"t:{digest}"
