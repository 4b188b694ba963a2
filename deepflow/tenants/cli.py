"""`deepflow tenants create|list|revoke|rotate-key`: manage the tenants of this host's SQLite store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("tenants", help="tenants and their API keys").add_subparsers(
        dest="tenants_command", required=True
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", default=None, help="tenants database (default $DEEPFLOW_HOME/tenants.sqlite)")

    c = t.add_parser("create", help="a new tenant; prints its API key once")
    common(c)
    c.add_argument("name")
    c.add_argument("--id", default=None, help="tenant id (default: generated)")
    c.add_argument("--slo-class", default="standard", choices=["interactive", "standard", "batch"])
    c.add_argument("--rpm", type=int, default=None, help="requests per minute")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute (prompt + max output)")
    c.add_argument("--max-concurrent", type=int, default=None)
    c.add_argument("--ttft-slo", type=float, default=None, help="TTFT target, seconds")
    c.add_argument("--tpot-slo", type=float, default=None, help="TPOT target, seconds")
    c.add_argument("--models", default=None, help="comma-separated model names it may use (default all)")
    c.set_defaults(func=cmd_create)
    ls = t.add_parser("list", help="every tenant (no keys: only their hints)")
    common(ls)
    ls.set_defaults(func=cmd_list)
    r = t.add_parser("revoke", help="stop a tenant's keys at once")
    common(r)
    r.add_argument("tenant_id")
    r.set_defaults(func=cmd_revoke)
    k = t.add_parser("rotate-key", help="replace a tenant's keys with a new one; prints it once")
    common(k)
    k.add_argument("tenant_id")
    k.set_defaults(func=cmd_rotate)


def _store(args: argparse.Namespace):
    from deepflow.tenants.store import TenantStore, default_tenants_path

    return TenantStore(Path(args.db) if args.db else default_tenants_path())


def cmd_create(args: argparse.Namespace) -> int:
    from deepflow.tenants.model import SLOClass, TenantLimits
    from deepflow.tenants.store import TenantExists

    try:
        limits = TenantLimits(
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            max_concurrent_requests=args.max_concurrent,
            ttft_slo_s=args.ttft_slo,
            tpot_slo_s=args.tpot_slo,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    store = _store(args)
    try:
        tenant, key = store.create(
            args.name, slo_class=SLOClass(args.slo_class), limits=limits, models=models, tenant_id=args.id
        )
    except TenantExists as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps({"tenant_id": tenant.tenant_id, "name": tenant.name, "api_key": key}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import msgspec

    store = _store(args)
    try:
        for tenant in store.list():
            row = msgspec.to_builtins(tenant)
            row["keys"] = store.key_hints(tenant.tenant_id)
            print(json.dumps(row))
    finally:
        store.close()
    return 0


def _by_id(args: argparse.Namespace, action) -> int:
    from deepflow.tenants.store import TenantNotFound

    store = _store(args)
    try:
        return action(store)
    except TenantNotFound:
        print(f"error: no tenant {args.tenant_id!r}", file=sys.stderr)
        return 1
    finally:
        store.close()


def cmd_revoke(args: argparse.Namespace) -> int:
    return _by_id(args, lambda s: (s.revoke(args.tenant_id), 0)[1])


def cmd_rotate(args: argparse.Namespace) -> int:
    def rotate(s) -> int:
        print(json.dumps({"tenant_id": args.tenant_id, "api_key": s.rotate_key(args.tenant_id)}))
        return 0

    return _by_id(args, rotate)
