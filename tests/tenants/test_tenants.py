"""Tenants: the store (hashed keys, revoke, rotate), the limiter on a fake clock, namespaces, the CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.tenants import (
    LimitKind,
    SLOClass,
    TenantExists,
    TenantLimiter,
    TenantLimits,
    TenantNotFound,
    TenantStore,
    cache_namespace,
)


@pytest.fixture
def store(tmp_path):
    s = TenantStore(tmp_path / "tenants.sqlite", clock=lambda: 1000.0)
    yield s
    s.close()


def test_keys_are_stored_hashed_and_authenticate(store, tmp_path):
    tenant, key = store.create(
        "acme", slo_class=SLOClass.INTERACTIVE, limits=TenantLimits(requests_per_minute=5)
    )
    assert key.startswith("df-") and len(key) > 40
    assert store.authenticate(key) == tenant
    assert store.authenticate(key + "x") is None and store.authenticate("sk-other") is None
    raw = sqlite3.connect(tmp_path / "tenants.sqlite").execute("SELECT * FROM api_keys").fetchall()
    assert raw and all(key not in json.dumps(row) for row in raw)  # only the hash and a hint are kept
    assert store.key_hints(tenant.tenant_id)[0].startswith("df-")


def test_rotate_replaces_every_key_and_revoke_stops_them(store):
    _, key = store.create("acme", tenant_id="acme")
    new = store.rotate_key("acme")
    assert store.authenticate(key) is None and store.authenticate(new).tenant_id == "acme"
    store.revoke("acme")
    assert store.authenticate(new) is None
    assert store.get("acme").revoked and len(store) == 1
    with pytest.raises(TenantNotFound):
        store.rotate_key("nobody")
    with pytest.raises(TenantExists):
        store.create("again", tenant_id="acme")


def test_a_second_store_on_the_same_file_sees_the_same_tenants(store, tmp_path):
    tenant, key = store.create("acme", models=["m1"])
    other = TenantStore(tmp_path / "tenants.sqlite")
    try:
        got = other.authenticate(key)
        assert got == tenant and got.may_use("m1") and not got.may_use("m2")
    finally:
        other.close()


def test_cache_namespaces_never_collide_across_tenants():
    assert cache_namespace("a") != cache_namespace("b")
    assert cache_namespace("a", "x") != cache_namespace("a")
    assert cache_namespace("a", "x") == cache_namespace("a", "x")
    # The separator keeps ("a", "b\0c") and ("a\0b", "c") apart.
    assert cache_namespace("a", "b\0c") != cache_namespace("a\0b", "c")


def test_requests_per_minute_refuses_then_recovers():
    lim = TenantLimiter(TenantLimits(requests_per_minute=2), now=0.0)
    assert lim.try_admit(0.0, 10).admitted and lim.try_admit(0.0, 10).admitted
    refused = lim.try_admit(1.0, 10)
    assert not refused.admitted and refused.limit == LimitKind.REQUESTS
    assert refused.retry_after_s == pytest.approx(29.0)  # one request refills every 30 s
    assert TenantLimiter.retry_after_header(refused) == "29"
    assert lim.try_admit(30.0, 10).admitted


def test_tokens_per_minute_too_large_and_refund():
    lim = TenantLimiter(TenantLimits(tokens_per_minute=600), now=0.0)
    assert lim.try_admit(0.0, 601).limit == LimitKind.TOO_LARGE
    assert lim.try_admit(0.0, 500).admitted
    r = lim.try_admit(0.0, 200)
    assert r.limit == LimitKind.TOKENS and r.retry_after_s == pytest.approx(10.0)  # 100 tokens at 10/s
    lim.refund(300)  # the first request used fewer tokens than it was charged
    assert lim.try_admit(0.0, 200).admitted


def test_concurrency_is_released_on_exit():
    lim = TenantLimiter(TenantLimits(max_concurrent_requests=1), now=0.0)
    assert lim.try_admit(0.0, 1).admitted
    assert lim.try_admit(0.0, 1).limit == LimitKind.CONCURRENCY
    lim.release()
    assert lim.try_admit(0.0, 1).admitted
    lim.release()
    with pytest.raises(RuntimeError):
        lim.release()


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(1, 50),
    tpm=st.integers(100, 5000),
    ops=st.lists(st.tuples(st.floats(0.0, 10.0), st.integers(1, 400)), min_size=1, max_size=200),
)
def test_admitted_never_exceeds_the_allowance(rpm, tpm, ops):
    """Over any run, admitted requests ≤ rpm + elapsed·rpm/60, and the same for tokens (a refusal charges
    nothing, so refused requests cannot eat the allowance)."""
    lim = TenantLimiter(TenantLimits(requests_per_minute=rpm, tokens_per_minute=tpm), now=0.0)
    now = 0.0
    n = tokens = 0
    for dt, cost in ops:
        now += dt
        if lim.try_admit(now, cost).admitted:
            n += 1
            tokens += cost
            lim.release()
        assert n <= rpm + now * rpm / 60 + 1e-6
        assert tokens <= tpm + now * tpm / 60 + 1e-6


def test_cli_create_list_rotate_revoke(tmp_path):
    db = str(tmp_path / "t.sqlite")

    def run(*args):
        p = subprocess.run(
            [sys.executable, "-m", "deepflow.cli", "tenants", *args, "--db", db],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return p.returncode, p.stdout, p.stderr

    rc, out, _ = run("create", "acme", "--id", "acme", "--rpm", "60", "--slo-class", "interactive")
    assert rc == 0
    created = json.loads(out)
    assert created["tenant_id"] == "acme" and created["api_key"].startswith("df-")
    rc, out, _ = run("list")
    row = json.loads(out.splitlines()[0])
    assert row["limits"]["requests_per_minute"] == 60 and row["slo_class"] == "interactive"
    assert created["api_key"] not in out
    rc, out, _ = run("rotate-key", "acme")
    assert rc == 0 and json.loads(out)["api_key"] != created["api_key"]
    assert run("revoke", "acme")[0] == 0
    rc, _, err = run("revoke", "nobody")
    assert rc == 1 and "no tenant" in err
    rc, _, err = run("create", "bad", "--rpm", "0")
    assert rc == 2 and "requests_per_minute" in err
