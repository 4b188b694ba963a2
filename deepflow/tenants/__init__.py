"""Tenants: who sends a request, what it may use, how fast, and at which SLO class.

`model.py` (Tenant, TenantLimits, SLOClass, the per-tenant cache namespace), `limits.py` (requests/min,
tokens/min, concurrency: pure token buckets on the caller's clock), `store.py` (SQLite, keys hashed),
`cli.py` (`deepflow tenants ...`).
"""

from deepflow.tenants.limits import Admission, LimitKind, TenantLimiter
from deepflow.tenants.model import SLOClass, Tenant, TenantLimits, cache_namespace
from deepflow.tenants.store import TenantExists, TenantNotFound, TenantStore

__all__ = [
    "Admission",
    "LimitKind",
    "SLOClass",
    "Tenant",
    "TenantExists",
    "TenantLimiter",
    "TenantLimits",
    "TenantNotFound",
    "TenantStore",
    "cache_namespace",
]
