"""The typed messages between platform processes (msgspec over ZeroMQ).

    JE  ──DEALER──▶ TE (ROUTER):  Hello, then the engine commands (add / abort / contexts / cache reset /
                                  KVPrefilled, engine/kv_transfer.py)
    TE  ──ROUTER──▶ JE:           EngineCoreOutputs (outputs, stats, KV events), EngineCoreFailed
    TE  ──DEALER──▶ CM (ROUTER):  TEHeartbeat (who it is, where it listens, its load) every second
    JE  ──DEALER──▶ CM:           JEHeartbeat (with the view version it holds), ClusterQuery
    JE  ──DEALER──▶ CM:           ScaleGroup (an admin's scaling command)
    CM  ──ROUTER──▶ JE:           ClusterView on every TE-list change (and to a JE whose version is stale),
                                  ClusterReport, ScaleResult
    CM  ──ROUTER──▶ TE:           StopTE

A heartbeat carries the sender's whole identity, so a restarted cluster manager rebuilds its registry from
them and from SQLite without disturbing any TE.
"""

from __future__ import annotations

from typing import Any

import msgspec

from deepflow.engine.core_client import (
    AbortRequests,
    AddRequest,
    EngineCoreFailed,
    ReleaseContext,
    ResetPrefixCache,
)
from deepflow.engine.kv_transfer import KVPrefilled
from deepflow.engine.request import EngineCoreOutputs, SchedulerStats


class TEInfo(msgspec.Struct, kw_only=True, frozen=True):
    """A ready TE: what a JE needs to route to it and to present its model."""

    te_id: str
    incarnation: int  # bumped on every restart of this TE id
    model: str  # served model name = its TE group
    pid: int
    host: str
    address: str  # the TE's ROUTER socket
    max_model_len: int
    eos_token_ids: list[int]
    model_path: str
    block_size: int
    num_kv_blocks: int
    # Its group's role (policies/router.py: TERole). The cluster manager knows it from the spec and stamps
    # it on what it pushes, so the JEs see it whatever the TE itself reported.
    role: str = "colocated"


class Hello(msgspec.Struct, tag="hello"):
    """A JE (re)connecting: the TE aborts what an earlier incarnation of that JE left running."""

    je_id: str
    incarnation: int


JEToTE = AddRequest | AbortRequests | ReleaseContext | ResetPrefixCache | KVPrefilled | Hello
TEToJE = EngineCoreOutputs | EngineCoreFailed


class TEHeartbeat(msgspec.Struct, tag="te_heartbeat"):
    info: TEInfo
    stats: SchedulerStats | None = None


class JEHeartbeat(msgspec.Struct, tag="je_heartbeat"):
    je_id: str
    pid: int
    view_version: str = ""


class ClusterQuery(msgspec.Struct, tag="cluster_query"):
    query_id: int


class ScaleGroup(msgspec.Struct, tag="scale_group"):
    """Run `tes` TEs in `model`'s `role` group: new ones are started; surplus ones drain (no new requests,
    the running ones finish) and then stop."""

    query_id: int
    model: str
    tes: int
    role: str = "colocated"


ToCM = TEHeartbeat | JEHeartbeat | ClusterQuery | ScaleGroup


class TEState(msgspec.Struct, kw_only=True):
    """One TE as the CM sees it."""

    te_id: str
    model: str
    incarnation: int
    role: str = "colocated"  # its group (TERole)
    state: str = "starting"  # starting | ready | dead (restarting) | draining (scaled down) | removed
    pid: int | None = None
    info: TEInfo | None = None  # set once ready


class ClusterView(msgspec.Struct, tag="cluster_view"):
    version: str
    tes: list[TEState]


class ClusterReport(msgspec.Struct, tag="cluster_report"):
    query_id: int
    report: dict[str, Any]


class ScaleResult(msgspec.Struct, tag="scale_result"):
    query_id: int
    error: str | None
    report: dict[str, Any]


class StopTE(msgspec.Struct, tag="stop_te"):
    pass


FromCM = ClusterView | ClusterReport | ScaleResult | StopTE

encoder = msgspec.msgpack.Encoder()
je_to_te = msgspec.msgpack.Decoder(JEToTE)
te_to_je = msgspec.msgpack.Decoder(TEToJE)
to_cm = msgspec.msgpack.Decoder(ToCM)
from_cm = msgspec.msgpack.Decoder(FromCM)
