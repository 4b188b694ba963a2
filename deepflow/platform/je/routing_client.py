"""A job executor's view of one model's TEs as a single engine: route each request, colocated or split over a
prefill and a decode TE, and drive it there.

`RoutingCoreClient` speaks the `EngineCoreClient` protocol, so `AsyncLLM` and the HTTP edge run over a model's
TEs unchanged. A model is served by up to three TE groups, one per role (`TERole`: colocated, prefill,
decode). Per request the model's `Router` (policies/router.py) gets a snapshot of every group — each TE's last
reported load, raised by what this JE has routed since (a burst would otherwise all go to the same "least
loaded" TE), and the group's prompt tree, kept in step by the TEs' cache-residency events — and answers with
a `Route`: one colocated TE, or a prefill TE and a decode TE.

Every front-end sequence is one record (`_Seq`): its job and tasks (`deepflow.platform.jobs`), the legs it
runs on TEs (`_Leg`: one engine request on one TE, for one task) and where it stands (`Phase`). A colocated
sequence is one leg. A disaggregated one follows the contract of `engine/kv_transfer.py`:

    RESERVING   AddRequest(KVConsume) to D; D answers with a `KVSink` (the blocks it reserved)
    PREFILLING  AddRequest(KVProduce(sink)) to P; P prefills, pushes the KV into the sink, samples one token
    DECODING    P's token is streamed (the response's first) and handed to D (`KVPrefilled`); D's tokens
                follow; P finishes once D holds every byte (`kv_transferred`)
    ENDED       the front end has the sequence's last output (P may still be finishing its transfer)

Failures, whichever the phase: a TE that dies, a decode TE whose wait timed out ("kv_timeout"), a prefill TE
whose transfer failed ("kv_transfer"). The surviving leg is aborted on its TE (every block it holds there is
released), then the sequence is retried on another route while nothing of it reached the client (a
non-streaming request even after tokens: the front end is told to start over) and attempts remain, else it
ends with an abort naming the TE. One exception: a prefill TE that dies after its first token reached the
decode TE leaves the verdict to the decode TE — it may hold every byte already — whose wait is bounded by
`KVConsume.timeout_s`. Every wait has a bound: the engines bound the hand-over themselves and the JE keeps
its own backstop past theirs (`HANDOVER_SLACK_SECONDS`), a sequence is sent at most `MAX_ATTEMPTS` times,
and a retry that finds no TE able to take it (the only decode TE died) waits at most `park_s` for the
restarted one.

Requests stay with their TEs: aborts go to every leg, a context lives on the colocated TE that computed it and
requests naming it follow. Outputs of all TEs are merged into one stream; their scheduler stats are summed, so
the engine metrics describe the model. TEs join and leave while it runs (`add_te`, on the cluster manager's
push); with none alive new requests are refused until one joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from deepflow.engine.contexts import CreateContext
from deepflow.engine.core_client import (
    Command,
    EngineCoreClient,
    EngineDeadError,
    ReleaseContext,
    ResetPrefixCache,
)
from deepflow.engine.kv_transfer import KVConsume, KVPrefilled, KVProduce, KVSink, KVTransfer
from deepflow.engine.request import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
    SchedulerStats,
)
from deepflow.engine.sampling_params import SamplingParams
from deepflow.platform.je.context_store import ContextRecord, ContextStore
from deepflow.platform.je.policies import (
    Decision,
    GlobalPromptTree,
    GroupSnapshot,
    NoHealthyTE,
    Policy,
    Reason,
    RoutingRequest,
    TELoad,
    estimated_load,
    routed_tokens,
)
from deepflow.platform.je.policies.router import (
    FixedRouter,
    ModelGroups,
    ModeReason,
    Route,
    Router,
    ServeMode,
    TERole,
)
from deepflow.platform.jobs import TERMINAL, Job, JobTracker, State, Task
from deepflow.platform.spec import KVTransferSpec

logger = logging.getLogger(__name__)

# A sequence is sent at most this many times (TE deaths, transfer failures): a fault that follows it
# everywhere ends it with its error instead of looping.
MAX_ATTEMPTS = 4
# A retry that finds no TE able to take it (the only decode TE died: no pair is left) waits this long for
# one to join — the cluster manager restarts a dead TE within seconds plus its model load — then fails.
PARK_SECONDS = 120.0
# The JE's own bound on a disaggregated sequence's hand-over (RESERVING, PREFILLING): the engines bound it
# (KVConsume.timeout_s, KVProduce.lease_s); this backstop, past theirs, covers a TE that stays alive but
# never answers. The sequence then fails over as if the leg's TE had failed.
HANDOVER_SLACK_SECONDS = 15.0
SWEEP_SECONDS = 1.0  # how often the bounds (parked, hand-over) are checked
KV_ERRORS = frozenset(
    {"kv_timeout", "kv_transfer"}
)  # a transfer failed: the route's fault, not the request's
RECENT_ROUTES = 32  # routes shown in the cluster report


class Phase(enum.StrEnum):
    """Where a sequence stands (module docstring)."""

    COLOCATED = "colocated"  # on one TE
    RESERVING = "reserving"  # the decode TE reserves blocks; its KVSink is not back yet
    PREFILLING = "prefilling"  # the prefill TE prefills and pushes the KV; the first token is not back yet
    DECODING = "decoding"  # the first token streamed and handed to the decode TE, whose tokens follow
    PARKED = "parked"  # its retry found no TE that could take it: waits (bounded) for one to join
    ENDED = "ended"  # the front end has the last output


@dataclass
class _TE:
    te_id: str
    client: EngineCoreClient
    role: TERole = TERole.COLOCATED
    stats: SchedulerStats | None = None
    routed_tokens: int = 0  # routed here since its last stats: not in its report yet
    legs: dict[str, _Leg] = field(default_factory=dict)  # engine request id -> the leg it is
    dead: bool = False
    draining: bool = False  # scaled down: finishes its requests, gets no new ones

    def load(self) -> TELoad:
        healthy = not self.dead and not self.draining and self.client.is_alive()
        return estimated_load(self.te_id, self.stats, self.routed_tokens, healthy)


@dataclass(eq=False)
class _Leg:
    """One task of a sequence running on one TE as one engine request."""

    seq: _Seq
    role: TERole
    te: _TE
    engine_id: str  # the request's id on that TE (a retry on a TE that saw the sequence gets a fresh one)
    task: Task | None
    live: bool = True  # on its TE: a final output, an abort we sent or the TE's death ends it


@dataclass(eq=False)
class _Seq:
    """A front-end sequence: the JE's one record of it (job, tasks, legs, phase)."""

    request: EngineCoreRequest
    routing: RoutingRequest
    job: Job | None
    phase: Phase = Phase.COLOCATED
    mode: ServeMode | None = None  # of the current attempt
    route: Route | None = None
    tasks: dict[TERole, Task] = field(default_factory=dict)  # the current mode's tasks, by role
    legs: dict[TERole, _Leg] = field(default_factory=dict)  # the current attempt's legs, by role
    planned_prefill: str | None = None  # the prefill TE chosen with the route, sent once D's sink is back
    handover_deadline: float | None = None  # RESERVING/PREFILLING must move on by then (JE clock)
    attempt: int = 0
    streamed: bool = False  # output reached the front end (a retry would repeat it, unless restartable)
    aborted: bool = False  # the front end aborted it: never retried
    output_tokens: int = 0  # tokens the front end got (what the router's predictor learns from)
    prefill_failure: tuple[_TE, str] | None = None  # P died after handing its token over: D decides

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def live_legs(self) -> list[_Leg]:
        return [leg for leg in self.legs.values() if leg.live]


class RoutingCoreClient:
    def __init__(
        self,
        clients: dict[str, EngineCoreClient],
        policy: Policy,
        block_size: int,
        *,
        jobs: JobTracker | None = None,
        model: str = "",
        contexts: ContextStore | None = None,
        roles: dict[str, TERole] | None = None,
        router: Router | None = None,
        kv_transfer: KVTransferSpec | None = None,
        park_s: float = PARK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ValueError("a TE group needs at least one TE")
        roles = roles or {}
        self.tes = {
            te_id: _TE(te_id, client, TERole(roles.get(te_id, TERole.COLOCATED)))
            for te_id, client in clients.items()
        }
        first = next(iter(clients.values()))
        self.max_model_len = min(c.max_model_len for c in clients.values())
        self.eos_token_ids = first.eos_token_ids
        self.model_path: Path = first.model_path
        self.policy = policy
        self.router: Router = router or FixedRouter(policy=policy)
        self.kv_transfer = kv_transfer or KVTransferSpec()
        self.trees = {role: GlobalPromptTree(block_size) for role in TERole}  # one per group
        self.jobs = jobs
        self.model = model
        self._seqs: dict[str, _Seq] = {}  # live front-end sequence id -> its record
        self.park_s = park_s
        self._clock = clock
        self._parked: dict[str, float] = {}  # parked sequence id -> when its wait ends (self._clock)
        self._context_owner: dict[str, _TE] = {}
        self.contexts = contexts  # where contexts live (shared by the JEs); re-created on use if none pins
        self._recreating: dict[str, tuple[str, _TE]] = {}  # context-re-creating request -> (context, TE)
        self._recreations = itertools.count(1)
        self._retired_counters = dict.fromkeys(_COUNTERS, 0)  # what TEs that left had counted
        self.decisions: deque[tuple[str, Decision]] = deque(maxlen=4096)  # (request id, per-TE decision)
        self.routes: deque[tuple[str, Route]] = deque(maxlen=RECENT_ROUTES)
        self.reason_counts: Counter[str] = Counter()  # per-TE reasons (prefixed by role for P/D) since start
        self.mode_counts: Counter[str] = Counter()  # "mode/mode_reason" since start
        self._merged: asyncio.Queue[EngineCoreOutputs | BaseException] | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def tree(self) -> GlobalPromptTree:
        """The colocated group's prompt tree."""
        return self.trees[TERole.COLOCATED]

    # ---- membership ------------------------------------------------------------------------------------
    def add_te(self, te_id: str, client: EngineCoreClient, role: TERole | str = TERole.COLOCATED) -> None:
        """A TE joined (or came back under a new incarnation): route to it from now on."""
        old = self.tes.get(te_id)
        if old is not None and not old.dead:
            self._publish(self._fail_over(old, "replaced by a new incarnation"))
        te = self.tes[te_id] = _TE(te_id, client, TERole(role))
        if self._merged is not None:
            self._pumps = [task for task in self._pumps if not task.done()]
            self._pumps.append(asyncio.create_task(self._pump(te)))
        logger.info("TE %s (%s) joined model %s", te_id, te.role, self.model or "-")
        self._unpark()

    def set_draining(self, te_id: str, draining: bool) -> None:
        """Stop (or resume) routing new requests to a TE; the requests it has run to their end."""
        te = self.tes.get(te_id)
        if te is not None and te.draining != draining:
            te.draining = draining
            logger.info("TE %s of model %s %s", te_id, self.model or "-", "drains" if draining else "serves")
            if not draining:
                self._unpark()

    def _publish(self, item: EngineCoreOutputs | BaseException) -> None:
        if self._merged is not None:
            self._merged.put_nowait(item)

    # ---- routing ---------------------------------------------------------------------------------------
    def _snapshot(self, role: TERole, excluded: frozenset[str]) -> GroupSnapshot | None:
        loads = [te.load() for te in self.tes.values() if te.role == role]
        if not loads:
            return None
        if excluded:
            loads = [msgspec.structs.replace(load, healthy=False) if load.te_id in excluded else load
                     for load in loads]  # fmt: skip
        return GroupSnapshot(tes=loads, tree=self.trees[role], name=f"{self.model or '-'}/{role}")

    def groups(self, excluded: frozenset[str] = frozenset()) -> ModelGroups:
        return ModelGroups(**{str(role): self._snapshot(role, excluded) for role in TERole})

    def route(self, request: EngineCoreRequest, excluded: frozenset[str] = frozenset()) -> Route:
        """Where a request goes (nothing is sent): the colocated TE of the context it names, else the
        router's choice among the healthy TEs not `excluded`. Raises `NoHealthyTE`."""
        routing = _routing(request)
        if request.context_id is not None or request.create_context is not None:
            route = self._route_context(request, routing, excluded)
        else:
            route = self.router.route(routing, self.groups(excluded))
        self.routes.append((request.request_id, route))
        self.mode_counts[f"{route.mode}/{route.mode_reason}"] += 1
        for role, decision in ((TERole.PREFILL, route.prefill), (TERole.DECODE, route.decode)):
            if decision is not None:
                self._count(request.request_id, decision, role)
        if route.colocated is not None:
            self._count(request.request_id, route.colocated, TERole.COLOCATED)
        return route

    def _count(self, request_id: str, decision: Decision, role: TERole) -> None:
        self.decisions.append((request_id, decision))
        key = str(decision.reason) if role == TERole.COLOCATED else f"{role}:{decision.reason}"
        self.reason_counts[key] += 1

    def _route_context(
        self, request: EngineCoreRequest, routing: RoutingRequest, excluded: frozenset[str]
    ) -> Route:
        """Contexts are pinned on colocated TEs (a prefill TE keeps no KV, a decode TE computes none)."""
        group = self._snapshot(TERole.COLOCATED, excluded)
        if group is None:
            raise ValueError("contexts need a colocated TE; this model is served only disaggregated")
        owner = self._context_holder(request.context_id) if request.context_id is not None else None
        if owner is not None and owner.load().healthy and owner.te_id not in excluded:
            decision = Decision(te_id=owner.te_id, reason=Reason.CONTEXT)
        else:
            decision = self.policy.select(routing, group)
        return Route(mode=ServeMode.COLOCATED, mode_reason=ModeReason.CONTEXT, colocated=decision)

    def report(self) -> dict[str, Any]:
        """This JE's routing for the model: counts of every reason, the router's state, recent routes."""
        return {
            "router": self.router.report(),
            "modes": dict(self.mode_counts),
            "reasons": dict(self.reason_counts),
            "recent": [
                {
                    "request_id": request_id,
                    "mode": str(route.mode),
                    "mode_reason": str(route.mode_reason),
                    "predicted_output_tokens": route.predicted_output_tokens,
                    "tes": {
                        str(role): {
                            "te_id": d.te_id,
                            "reason": str(d.reason),
                            "matched_tokens": d.matched_tokens,
                        }
                        for role, d in (
                            (TERole.COLOCATED, route.colocated),
                            (TERole.PREFILL, route.prefill),
                            (TERole.DECODE, route.decode),
                        )
                        if d is not None
                    },
                }
                for request_id, route in self.routes
            ],
        }

    # ---- contexts --------------------------------------------------------------------------------------
    def _context_holder(self, context_id: str) -> _TE | None:
        """The live TE of this group that pins (or is pinning) the context, by this JE's knowledge or the
        shared store's (a context made through another JE); None when no live TE does."""
        te = self._context_owner.get(context_id)
        if te is not None and not te.dead and te.client.is_alive():
            return te
        record = self.contexts.get(context_id) if self.contexts is not None else None
        if record is None or record.te_id is None:
            return None
        te = self.tes.get(record.te_id)
        if te is None or te.dead or not te.client.is_alive() or _incarnation(te) != record.incarnation:
            return None  # that TE left, died or came back empty: the context is resident nowhere
        return te

    def context_te(self, context_id: str) -> str | None:
        """Where a context lives now (a draining TE that still pins it included), or None."""
        te = self._context_holder(context_id)
        return te.te_id if te is not None else None

    def _needs_recreate(self, request: EngineCoreRequest) -> ContextRecord | None:
        """The context a request names when no healthy TE pins it: it is pinned again where the request
        goes (its TE was drained, died or restarted)."""
        if request.context_id is None or request.create_context is not None or self.contexts is None:
            return None
        holder = self._context_holder(request.context_id)
        if holder is not None and holder.load().healthy:
            return None
        return self.contexts.get(request.context_id)

    def _recreate(self, record: ContextRecord, te: _TE) -> None:
        """Pin `record` on `te` again, just before the request that uses it: the creator is admitted first,
        so with prefix caching the request shares the blocks it computes in the same step."""
        request_id = f"context-{record.context_id}.r{next(self._recreations)}"
        te.client.add_request(
            EngineCoreRequest(
                request_id=request_id,
                prompt_token_ids=list(record.token_ids),
                sampling_params=SamplingParams(temperature=0.0, max_tokens=1),
                cache_salt=record.cache_salt,
                create_context=CreateContext(
                    context_id=record.context_id, ttl_seconds=max(1.0, record.expires_at - time.time())
                ),
            )
        )
        self._recreating[request_id] = (record.context_id, te)
        te.routed_tokens += len(record.token_ids)
        self._context_owner[record.context_id] = te
        assert self.contexts is not None
        self.contexts.locate(record.context_id, te.te_id, _incarnation(te))
        logger.info("context %s re-created on TE %s (first use since its TE left)", record.context_id,
                    te.te_id)  # fmt: skip

    def _recreated(self, request_id: str, out: EngineCoreOutput) -> None:
        """A re-creating request ended (or its TE died): the context is pinned there, or nowhere."""
        context_id, te = self._recreating.pop(request_id)
        if out.context_pinned_tokens is None:
            logger.warning("context %s could not be re-created on TE %s: %s", context_id, te.te_id,
                           out.stop_reason)  # fmt: skip
            if self._context_owner.get(context_id) is te:
                del self._context_owner[context_id]
            record = self.contexts.get(context_id) if self.contexts is not None else None
            if record is not None and record.te_id == te.te_id and self.contexts is not None:
                self.contexts.locate(context_id, None, None)

    def te_of(self, request_id: str) -> str | None:
        """The TE(s) serving a sequence: "te-0" (colocated), or "te-p0,te-d0" (its prefill TE, then its
        decode TE: the `x-deepflow-te` header's format)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        if seq.mode == ServeMode.DISAGGREGATED:
            decode = seq.legs.get(TERole.DECODE)
            prefill = seq.legs[TERole.PREFILL].te.te_id if TERole.PREFILL in seq.legs else seq.planned_prefill
            return ",".join(t for t in (prefill, decode.te.te_id if decode else None) if t)
        leg = seq.legs.get(TERole.COLOCATED)
        return leg.te.te_id if leg is not None else None

    # ---- submitting ------------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        seq = _Seq(request=request, routing=_routing(request), job=self._job_of(request))
        self._dispatch(seq)  # raises: nothing was sent, the record is failed and forgotten
        self._seqs[request.request_id] = seq

    def _dispatch(self, seq: _Seq, excluded: frozenset[str] = frozenset(), *, park: bool = False) -> None:
        """Send the sequence's next attempt: route it (the TEs in `excluded`, which just failed it, are
        avoided while others serve) and send its first leg. When no TE can take it: with `park` (a retry)
        it waits for one to join, at most `park_s`; else EngineDeadError (nothing sent; the record failed)."""
        seq.attempt += 1
        recreate = self._needs_recreate(seq.request)
        refused: frozenset[str] = frozenset()  # TEs whose socket refused it (dead, not yet reported so)
        while True:
            try:
                route = self._route_avoiding(seq.request, excluded | refused)
            except NoHealthyTE as exc:
                if park:
                    self._park(seq)
                    return
                self._fail_tasks(seq, "no task executor of the model is alive")
                seq.phase = Phase.ENDED
                raise EngineDeadError(f"no task executor of model {self.model or '-'} is alive") from exc
            except ValueError:
                self._fail_tasks(seq, "refused")
                seq.phase = Phase.ENDED
                raise
            self._set_mode(seq, route)
            try:
                if route.mode == ServeMode.COLOCATED:
                    assert route.colocated is not None
                    te = self.tes[route.colocated.te_id]
                    if recreate is not None and route.colocated.reason != Reason.CONTEXT:
                        self._recreate(recreate, te)
                        recreate = None
                    self._send_leg(seq, TERole.COLOCATED, te, None, route.colocated.matched_tokens)
                    seq.phase = Phase.COLOCATED
                else:
                    assert route.prefill is not None and route.decode is not None
                    te = self.tes[route.decode.te_id]
                    consume = KVConsume(mode=self.kv_transfer.mode, timeout_s=self.kv_transfer.timeout_s)
                    self._send_leg(seq, TERole.DECODE, te, consume, len(seq.request.prompt_token_ids))
                    seq.planned_prefill = route.prefill.te_id
                    self._handover(seq, Phase.RESERVING)
                return
            except EngineDeadError:
                refused |= {te.te_id}

    def _park(self, seq: _Seq) -> None:
        seq.attempt -= 1  # nothing was sent: not an attempt
        seq.phase = Phase.PARKED
        if seq.request_id not in self._parked:
            self._parked[seq.request_id] = self._clock() + self.park_s
            logger.warning("request %s waits up to %.0f s for a TE to retry on", seq.request_id, self.park_s)

    def _unpark(self) -> None:
        """A TE joined (or serves again): parked sequences try again, oldest first."""
        emitted: list[EngineCoreOutput] = []
        for request_id in list(self._parked):
            seq = self._seqs.get(request_id)
            if seq is None or seq.phase != Phase.PARKED:
                self._parked.pop(request_id, None)
                continue
            try:
                self._dispatch(seq, park=True)
            except Exception as exc:  # one request's retry failing must not strand the others
                self._end_failed(seq, None, None, f"could not be retried: {exc}", emitted)
            if seq.phase != Phase.PARKED:
                self._parked.pop(request_id, None)
        if emitted:
            self._publish(EngineCoreOutputs(outputs=emitted))

    async def _sweep(self) -> None:
        """Enforce the bounds the JE itself keeps: parked retries and stalled hand-overs."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                emitted = self.expire_parked() + self.expire_stalled()
            except Exception:  # the sweep must survive one bad record
                logger.exception("could not check the routing bounds")
                continue
            if emitted:
                self._publish(EngineCoreOutputs(outputs=emitted, stats=self._group_stats([])))

    def expire_stalled(self) -> list[EngineCoreOutput]:
        """Fail over the disaggregated sequences whose hand-over passed its bound; their final (or
        restarted) outputs."""
        now, emitted = self._clock(), []
        for seq in list(self._seqs.values()):
            if seq.phase not in (Phase.RESERVING, Phase.PREFILLING) or seq.handover_deadline is None:
                continue
            if now < seq.handover_deadline:
                continue
            role = TERole.DECODE if seq.phase == Phase.RESERVING else TERole.PREFILL
            leg = seq.legs.get(role)
            bound = self.kv_transfer.timeout_s + HANDOVER_SLACK_SECONDS
            what = "its KV sink" if role == TERole.DECODE else "its first token"
            seq.handover_deadline = None
            self._fail(seq, leg.te if leg else None, role, f"sent no {what} within {bound:.0f} s", emitted,
                       outcome="kv_timeout")  # fmt: skip
        return emitted

    def _handover(self, seq: _Seq, phase: Phase) -> None:
        """Enter a hand-over phase, with the JE's bound on leaving it."""
        seq.phase = phase
        seq.handover_deadline = self._clock() + self.kv_transfer.timeout_s + HANDOVER_SLACK_SECONDS

    def expire_parked(self) -> list[EngineCoreOutput]:
        """End the parked sequences whose wait is over; returns their final outputs."""
        now, emitted = self._clock(), []
        for request_id, until in list(self._parked.items()):
            seq = self._seqs.get(request_id)
            if seq is None or seq.phase != Phase.PARKED:
                self._parked.pop(request_id, None)
            elif now >= until:
                self._parked.pop(request_id)
                model = self.model or "-"
                why = f"no task executor of model {model} could take its retry within {self.park_s:.0f} s"
                self._end_failed(seq, None, None, why, emitted)
        return emitted

    def _route_avoiding(self, request: EngineCoreRequest, avoid: frozenset[str]) -> Route:
        """The route without the TEs in `avoid`; when that leaves no way, with those of them still alive (a
        transfer that failed between the only pair is tried again there)."""
        try:
            return self.route(request, avoid)
        except NoHealthyTE:
            dead = frozenset(t for t in avoid if (te := self.tes.get(t)) is None or not te.load().healthy)
            if dead == avoid:
                raise
            return self.route(request, dead)

    def _set_mode(self, seq: _Seq, route: Route) -> None:
        """The attempt's tasks: the same ones again when the mode is unchanged (their attempts accumulate);
        otherwise the old ones are marked retried and the new mode's tasks join the job."""
        seq.route = route
        if seq.mode == route.mode and seq.tasks:
            return
        for task in seq.tasks.values():
            self._move_task(seq, task, State.RETRIED, outcome="retried")
        seq.mode = route.mode
        roles = [TERole.COLOCATED] if route.mode == ServeMode.COLOCATED else [TERole.PREFILL, TERole.DECODE]
        seq.tasks = {}
        for role in roles:
            task = self._new_task(seq, role)
            if task is not None:
                seq.tasks[role] = task
                self._move_task(seq, task, State.QUEUED)

    def _send_leg(
        self, seq: _Seq, role: TERole, te: _TE, transfer: KVTransfer | None, matched_tokens: int
    ) -> _Leg:
        """Send one leg of the sequence to `te` (EngineDeadError when its socket refuses)."""
        request = seq.request
        # A retry of a disaggregated sequence may land on the TE that had its last attempt (the survivor of
        # a failed pair): a fresh id there, so nothing of the aborted attempt can be taken for it.
        engine_id = request.request_id
        if seq.attempt > 1 and role != TERole.COLOCATED:
            engine_id = f"{request.request_id}@{seq.attempt}"
        sent = (
            request
            if engine_id == request.request_id
            else msgspec.structs.replace(request, request_id=engine_id)
        )
        if transfer is None:
            te.client.add_request(sent)
        else:
            te.client.add_request(sent, kv_transfer=transfer)  # type: ignore[call-arg]
        task = seq.tasks.get(role)
        leg = _Leg(seq=seq, role=role, te=te, engine_id=engine_id, task=task)
        seq.legs[role] = leg
        te.legs[engine_id] = leg
        if task is not None:
            self._move_task(seq, task, State.SCHEDULED, te_id=te.te_id)
        # Work owed until the TE's next report: what it will not find cached (a decode TE computes none of
        # the prompt), plus the outputs (a prefill TE samples one).
        outputs = 1 if role == TERole.PREFILL else request.sampling_params.max_tokens
        te.routed_tokens += routed_tokens(len(request.prompt_token_ids), matched_tokens, outputs)
        if request.create_context is not None:
            self._context_owner[request.create_context.context_id] = te
            if self.contexts is not None:
                self.contexts.save(
                    ContextRecord(
                        context_id=request.create_context.context_id,
                        token_ids=list(request.prompt_token_ids),
                        cache_salt=request.cache_salt,
                        expires_at=time.time() + request.create_context.ttl_seconds,
                        te_id=te.te_id,
                        incarnation=_incarnation(te),
                    )
                )
        return leg

    def _start_prefill(self, seq: _Seq, sink: KVSink, emitted: list[EngineCoreOutput]) -> None:
        """D reserved the blocks: send the prefill leg, to the planned P while it serves, else another."""
        produce = KVProduce(sink=sink, mode=self.kv_transfer.mode, lease_s=self.kv_transfer.lease_s)
        refused: set[str] = set()
        while True:
            te = self.tes.get(seq.planned_prefill or "")
            if te is None or not te.load().healthy or te.te_id in refused:
                group = self._snapshot(TERole.PREFILL, frozenset(refused))
                try:
                    if group is None:
                        raise NoHealthyTE(f"{self.model or '-'}/prefill")
                    decision = self.policy.select(seq.routing, group)
                except NoHealthyTE:
                    failed = self.tes.get(seq.planned_prefill or "")
                    self._fail(seq, failed, TERole.PREFILL, "no prefill TE is alive", emitted)
                    return
                self._count(seq.request_id, decision, TERole.PREFILL)
                te = self.tes[decision.te_id]
                seq.planned_prefill = te.te_id
            try:
                matched = self.trees[TERole.PREFILL].match(
                    seq.request.cache_salt, seq.request.prompt_token_ids
                )
                self._send_leg(seq, TERole.PREFILL, te, produce, matched.get(te.te_id, 0))
                self._handover(seq, Phase.PREFILLING)
                return
            except EngineDeadError:
                refused.add(te.te_id)

    # ---- jobs ------------------------------------------------------------------------------------------
    def _job_of(self, request: EngineCoreRequest) -> Job | None:
        if self.jobs is None:
            return None
        job_id = request.request_id.partition("#")[0]  # the n sequences of a request are one job
        return self.jobs.get(job_id) or self.jobs.create(job_id, self.model, num_tasks=0, job_id=job_id)

    def _new_task(self, seq: _Seq, role: TERole) -> Task | None:
        if self.jobs is None or seq.job is None:
            return None
        return self.jobs.add_task(seq.job, str(role), sequence_id=seq.request_id)

    def _move_task(
        self,
        seq: _Seq,
        task: Task | None,
        state: State,
        *,
        te_id: str | None = None,
        error: str | None = None,
        outcome: str | None = None,
    ) -> None:
        if task is None or self.jobs is None or seq.job is None or task.state in TERMINAL:
            return
        if task.state == state == State.QUEUED:
            return  # a prefill task still waiting for its decode TE's sink stays queued
        self.jobs.move(seq.job, task, state, te_id=te_id, error=error, outcome=outcome)
        logger.log(
            logging.DEBUG if state in (State.QUEUED, State.RUNNING) else logging.INFO,
            "job=%s task=%s (%s) state=%s te=%s%s",
            seq.job.job_id,
            task.task_id,
            task.kind,
            state.value,
            te_id or task.te_id or "-",
            f" error={error!r}" if error else "",
        )

    def _fail_tasks(self, seq: _Seq, error: str) -> None:
        for task in seq.tasks.values():
            self._move_task(seq, task, State.FAILED, error=error)
        if not seq.tasks and seq.job is not None and self.jobs is not None:  # refused before any task existed
            task = self.jobs.add_task(seq.job, "colocated", sequence_id=seq.request_id)
            self._move_task(seq, task, State.FAILED, error=error)

    # ---- aborts and group commands ---------------------------------------------------------------------
    def abort(self, request_ids: list[str]) -> None:
        """The front end gave up on these sequences: every live leg is aborted on its TE (an abort of an
        unknown id is a no-op there); each leg's final output then ends its task. A parked one ends now."""
        by_te: dict[str, list[str]] = {}
        ended: list[EngineCoreOutput] = []
        for request_id in request_ids:
            seq = self._seqs.get(request_id)
            if seq is None:
                continue
            seq.aborted = True  # never retried elsewhere: nobody waits for it
            if seq.phase == Phase.PARKED:
                self._parked.pop(request_id, None)
                self._end_failed(seq, None, None, "aborted while waiting for a TE", ended)
            for leg in seq.live_legs():
                by_te.setdefault(leg.te.te_id, []).append(leg.engine_id)
        for te_id, ids in by_te.items():
            self.tes[te_id].client.abort(ids)
        if ended:
            self._publish(EngineCoreOutputs(outputs=ended))

    def send(self, command: Command) -> None:
        if isinstance(command, ReleaseContext):
            self._context_owner.pop(command.context_id, None)
            if self.contexts is not None:
                self.contexts.delete(command.context_id)
            # Every live TE: the context may have been made through another JE (or before a restart of this
            # one), and two JEs may each have pinned it again after its TE left; releasing an id a TE does
            # not pin is a no-op there.
            for target in list(self.tes.values()):
                if not target.dead:
                    with contextlib.suppress(EngineDeadError):
                        target.client.send(command)
        elif isinstance(command, ResetPrefixCache):
            for te in self.tes.values():
                if not te.dead:
                    with contextlib.suppress(EngineDeadError):
                        te.client.send(command)
        else:
            raise TypeError(f"{type(command).__name__} is not a group-level command")

    # ---- outputs -------------------------------------------------------------------------------------
    async def get_outputs(self) -> EngineCoreOutputs:
        self.start()
        assert self._merged is not None
        item = await self._merged.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def start(self) -> None:
        """Read every TE from now on (needs a running loop): a TE's stats and KV events flow before any
        request of ours does, and nothing queues up unread in its socket."""
        if self._merged is None:
            self._merged = asyncio.Queue()
            self._pumps = [asyncio.create_task(self._pump(te)) for te in self.tes.values()]
            self._sweeper = asyncio.create_task(self._sweep())

    async def _pump(self, te: _TE) -> None:
        assert self._merged is not None
        while True:
            try:
                batch = await te.client.get_outputs()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # only a failure to read the TE means it is gone
                if not te.dead:
                    logger.error("TE %s failed: %s", te.te_id, exc)
                    self._merged.put_nowait(self._fail_over(te, str(exc)))
                return
            if te.dead:
                return  # failed over already (the CM's push raced this read): its outputs are void
            try:
                self._merged.put_nowait(self._absorb(te, batch))
            except Exception:  # a bad batch must not take a healthy TE out of the group
                logger.exception("could not process a batch from TE %s", te.te_id)

    def _fail_over(self, te: _TE, reason: str) -> EngineCoreOutputs:
        """The TE is gone: every sequence with a leg there fails that leg (retried, or ended naming it)."""
        te.dead = True
        with contextlib.suppress(Exception):
            te.client.shutdown()  # its socket: nothing more will be read from this incarnation
        if te.stats is not None:
            for name in _COUNTERS:
                self._retired_counters[name] += getattr(te.stats, name)
        te.stats = None
        self.trees[te.role].remove_te(te.te_id)
        for context_id in [c for c, owner in self._context_owner.items() if owner is te]:
            del self._context_owner[context_id]
        emitted: list[EngineCoreOutput] = []
        for request_id in sorted(r for r, (_, owner) in self._recreating.items() if owner is te):
            # pinned nowhere now: the next use re-creates it again
            self._recreated(request_id, EngineCoreOutput(request_id=request_id, new_token_ids=[],
                                                         stop_reason=f"TE {te.te_id} died"))  # fmt: skip
        for engine_id in sorted(te.legs):
            leg = te.legs.pop(engine_id, None)
            if leg is not None and leg.live:
                leg.live = False
                try:
                    self._fail(leg.seq, te, leg.role, reason, emitted, dead=True)
                except Exception:  # one sequence's failure must not strand the others, nor its client
                    logger.exception("request %s: fail-over from TE %s failed", leg.seq.request_id, te.te_id)
                    self._seqs.pop(leg.seq.request_id, None)
                    emitted.append(
                        EngineCoreOutput(request_id=leg.seq.request_id, new_token_ids=[],
                                         finish_reason=FinishReason.ABORT,
                                         stop_reason=f"task executor {te.te_id} failed: {reason}")
                    )  # fmt: skip
        return EngineCoreOutputs(outputs=emitted, stats=self._group_stats([]))

    def _fail(
        self,
        seq: _Seq,
        te: _TE | None,
        role: TERole,
        reason: str,
        emitted: list[EngineCoreOutput],
        *,
        dead: bool = False,
        outcome: str = "te_died",
    ) -> None:
        """The sequence's `role` leg failed on `te` (it is over there): abort the surviving legs, then retry
        the sequence elsewhere or end it with an abort naming the TE."""
        if seq.phase == Phase.ENDED:
            # The front end has its answer (a prefill TE finishing its transfer after the decode TE
            # finished): only the task's record changes.
            self._move_task(seq, seq.tasks.get(role), State.FAILED, error=f"{_te_name(te)}: {reason}")
            return
        message = f"task executor {_te_name(te)} failed: {reason}"
        decode = seq.legs.get(TERole.DECODE)
        if (
            dead
            and role == TERole.PREFILL
            and seq.phase == Phase.DECODING
            and decode is not None
            and decode.live
        ):
            # P handed its token over, then died: D may hold every byte already (the transfer ended before
            # P's finish reached us). D's wait is bounded (KVConsume.timeout_s): its outcome decides.
            seq.prefill_failure = (te, reason) if te is not None else None
            logger.warning(
                "request %s: %s after its first token; the decode TE decides", seq.request_id, message
            )
            return
        for other in seq.live_legs():
            self._close_leg(other, abort=True)  # every block the survivor holds for it is released
        retry = (
            not seq.aborted
            and (not seq.streamed or seq.request.restartable)
            and seq.request.create_context is None
            and seq.attempt < MAX_ATTEMPTS
        )
        if retry:
            for task in seq.tasks.values():
                task.streamed = False
                cause = outcome if task is seq.tasks.get(role) else "peer_failed"
                self._move_task(seq, task, State.QUEUED, outcome=cause)
            seq.legs = {}
            seq.prefill_failure = None
            if seq.streamed:  # its tokens never left the JE: the front end starts it over
                seq.streamed = False
                seq.output_tokens = 0
                emitted.append(EngineCoreOutput(request_id=seq.request_id, new_token_ids=[], restarted=True))
            try:
                self._dispatch(seq, frozenset({te.te_id}) if te is not None else frozenset(), park=True)
                logger.warning("request %s retried after %s", seq.request_id, message)
                return
            except Exception as exc:  # one request's retry failing must not strand the others
                logger.warning("request %s could not be retried: %s", seq.request_id, exc)
                message = f"{message}; no retry: {exc}"
        self._end_failed(seq, te, role, message, emitted, message_is_final=True)

    def _end_failed(
        self,
        seq: _Seq,
        te: _TE | None,
        role: TERole | None,
        reason: str,
        emitted: list[EngineCoreOutput],
        *,
        message_is_final: bool = False,
    ) -> None:
        """End the sequence with an abort naming what failed (its `role` task on `te`; None: the sequence
        as a whole); its tasks take their final states."""
        message = reason if message_is_final or te is None else f"task executor {te.te_id} failed: {reason}"
        for other in seq.live_legs():
            self._close_leg(other, abort=True)
        for task_role, task in seq.tasks.items():
            if seq.aborted:
                self._move_task(seq, task, State.ABORTED, error=message)
            elif role is None or task_role == role:
                self._move_task(seq, task, State.FAILED, error=message)
            else:
                self._move_task(seq, task, State.ABORTED, error=f"its {role} task failed: {message}")
        final = EngineCoreOutput(
            request_id=seq.request_id, new_token_ids=[], finish_reason=FinishReason.ABORT, stop_reason=message
        )
        self._end(seq, final, emitted)

    def _close_leg(self, leg: _Leg, *, abort: bool) -> None:
        """The leg is over for us: its TE's later outputs for it are void; `abort` tells the TE to free it."""
        leg.live = False
        if leg.te.legs.get(leg.engine_id) is leg:
            del leg.te.legs[leg.engine_id]
        if abort and not leg.te.dead:
            with contextlib.suppress(Exception):
                leg.te.client.abort([leg.engine_id])

    def _end(self, seq: _Seq, final: EngineCoreOutput, emitted: list[EngineCoreOutput]) -> None:
        """The front end gets the sequence's last output; the record is forgotten (a prefill leg still
        finishing its transfer keeps a reference until its own final output)."""
        seq.phase = Phase.ENDED
        emitted.append(final)
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]
        if final.finish_reason is not None and final.finish_reason != FinishReason.ABORT:
            try:
                self.router.observe(seq.routing, seq.output_tokens)
            except Exception:  # a predictor's bug must not lose the output
                logger.exception("router %s could not observe request %s", self.router.name, seq.request_id)

    def _absorb(self, te: _TE, batch: EngineCoreOutputs) -> EngineCoreOutputs:
        if batch.stats is not None:
            te.stats = batch.stats
            te.routed_tokens = 0
        tree = self.trees[te.role]
        for event in batch.kv_events:
            tree.apply(msgspec.structs.replace(event, te_id=te.te_id))
        emitted: list[EngineCoreOutput] = []
        for out in batch.outputs:
            recreating = self._recreating.get(out.request_id)
            if recreating is not None and recreating[1] is te:  # ours, not the front end's
                if out.finish_reason is not None:
                    self._recreated(out.request_id, out)
                continue
            leg = te.legs.get(out.request_id)
            if leg is None or not leg.live:
                continue  # not (or no longer) this TE's: e.g. retried elsewhere already
            if out.finish_reason is not None:
                self._close_leg(leg, abort=False)  # the engine freed it
            if leg.role == TERole.COLOCATED:
                self._on_colocated(leg, out, emitted)
            elif leg.role == TERole.DECODE:
                self._on_decode(leg, out, emitted)
            else:
                self._on_prefill(leg, out, emitted)
        fresh = batch.stats.populate_latencies if batch.stats is not None else []
        return EngineCoreOutputs(outputs=emitted, stats=self._group_stats(fresh))

    def _forward(
        self, seq: _Seq, out: EngineCoreOutput, emitted: list[EngineCoreOutput], **changes: Any
    ) -> None:
        if out.request_id != seq.request_id:
            changes["request_id"] = seq.request_id
        emitted.append(msgspec.structs.replace(out, **changes) if changes else out)
        if out.new_token_ids:
            seq.streamed = True
            seq.output_tokens += len(out.new_token_ids)

    def _on_colocated(self, leg: _Leg, out: EngineCoreOutput, emitted: list[EngineCoreOutput]) -> None:
        seq = leg.seq
        if out.new_token_ids and leg.task is not None:
            leg.task.streamed = True
        if _scheduled(leg):
            self._move_task(seq, leg.task, State.RUNNING)
        if out.finish_reason is None:
            self._forward(seq, out, emitted)
            return
        if out.finish_reason != FinishReason.ABORT:
            self._move_task(seq, leg.task, State.FINISHED)
        else:
            error = str(out.stop_reason) if out.stop_reason else None
            failed = not seq.aborted and error is not None
            self._move_task(seq, leg.task, State.FAILED if failed else State.ABORTED, error=error)
        seq.output_tokens += len(out.new_token_ids)
        self._end(seq, out, emitted)

    def _on_decode(self, leg: _Leg, out: EngineCoreOutput, emitted: list[EngineCoreOutput]) -> None:
        seq = leg.seq
        if _scheduled(leg):
            self._move_task(seq, leg.task, State.RUNNING)  # D reserved the blocks (its sink is the proof)
        sink: KVSink | None = getattr(out, "kv_sink", None)
        if sink is not None and seq.phase == Phase.RESERVING and out.finish_reason is None:
            if seq.aborted:
                return  # the abort is on its way to D; its final output ends the sequence
            self._start_prefill(seq, sink, emitted)
            return
        # D's outputs carry the tokens after the first; the prompt's cache hits and queue time are P's.
        changes: dict[str, Any] = {"num_cached_tokens": 0, "queue_time": None}
        if out.finish_reason is None:
            if out.new_token_ids:
                if leg.task is not None:
                    leg.task.streamed = True
                self._forward(seq, out, emitted, **changes)
            return
        prefill = seq.legs.get(TERole.PREFILL)
        prefill_task = seq.tasks.get(TERole.PREFILL)
        if out.finish_reason != FinishReason.ABORT and out.error_type is None:
            self._move_task(seq, leg.task, State.FINISHED)
            if seq.prefill_failure is not None:  # P died after the transfer: D had every byte
                dead_te, why = seq.prefill_failure
                note = f"task executor {dead_te.te_id} failed after the transfer: {why}"
                self._move_task(seq, prefill_task, State.FINISHED, error=note)
            elif prefill is None or not prefill.live:
                self._move_task(seq, prefill_task, State.FINISHED)
            # else: P's own final output (kv_transferred) is on its way and ends its task
            seq.output_tokens += len(out.new_token_ids)
            self._end(seq, msgspec.structs.replace(out, request_id=seq.request_id, **changes), emitted)
            return
        if seq.aborted:
            for task in seq.tasks.values():
                self._move_task(seq, task, State.ABORTED)
            for other in seq.live_legs():
                self._close_leg(other, abort=True)
            self._end(seq, msgspec.structs.replace(out, request_id=seq.request_id, **changes), emitted)
            return
        if seq.prefill_failure is not None:  # P died, and D could not finish without it
            dead_te, why = seq.prefill_failure
            self._fail(seq, dead_te, TERole.PREFILL, why, emitted)
            return
        if out.error_type is None or out.error_type in KV_ERRORS:
            what = out.error_type or "aborted"
            self._fail(seq, leg.te, TERole.DECODE, f"{what}: {out.stop_reason}", emitted, outcome=what)
            return
        # The request itself was refused (e.g. "invalid"): the client's error, the same on any TE.
        self._move_task(seq, leg.task, State.FAILED, error=str(out.stop_reason))
        for other in seq.live_legs():
            self._close_leg(other, abort=True)
        self._move_task(seq, prefill_task, State.ABORTED)
        self._end(seq, msgspec.structs.replace(out, request_id=seq.request_id, **changes), emitted)

    def _on_prefill(self, leg: _Leg, out: EngineCoreOutput, emitted: list[EngineCoreOutput]) -> None:
        seq = leg.seq
        if _scheduled(leg):
            self._move_task(seq, leg.task, State.RUNNING)
        if out.new_token_ids and seq.phase == Phase.PREFILLING and not seq.aborted:
            # The response's first token: streamed now, and handed to D, which decodes from it once every
            # byte of the KV has arrived.
            token = out.new_token_ids[0]
            if leg.task is not None:
                leg.task.streamed = True
            first = {"new_token_ids": [token], "new_logprobs": out.new_logprobs[:1]}
            self._forward(seq, out, emitted, **first, finish_reason=None, stop_reason=None)
            seq.phase = Phase.DECODING
            seq.handover_deadline = None
            decode = seq.legs.get(TERole.DECODE)
            if decode is not None and decode.live:
                try:
                    decode.te.client.send(KVPrefilled(request_id=decode.engine_id, first_token_id=token))
                except EngineDeadError as exc:  # its death is on its way: fail over now
                    self._close_leg(decode, abort=False)
                    self._fail(seq, decode.te, TERole.DECODE, str(exc), emitted)
                    return
        if out.finish_reason is None:
            return
        transferred = bool(getattr(out, "kv_transferred", False))
        if transferred and out.finish_reason != FinishReason.ABORT:
            self._move_task(seq, leg.task, State.FINISHED)
            return
        error = str(out.stop_reason) if out.stop_reason else None
        if seq.aborted:
            self._move_task(seq, leg.task, State.ABORTED, error=error)
            return
        if seq.phase == Phase.ENDED:
            decode = seq.tasks.get(TERole.DECODE)
            if decode is not None and decode.state == State.FINISHED:
                # D decoded, so it had every byte (it never starts before): only P's confirmation failed.
                self._move_task(
                    seq, leg.task, State.FINISHED, error=f"{error} (after the decode TE finished)"
                )
            else:
                self._move_task(seq, leg.task, State.FAILED, error=error)
            return
        if out.error_type is None or out.error_type in KV_ERRORS:
            what = out.error_type or "aborted"
            self._fail(seq, leg.te, TERole.PREFILL, f"{what}: {out.stop_reason}", emitted, outcome=what)
            return
        # The request itself was refused (e.g. "invalid"): the client's error, the same on any TE.
        self._move_task(seq, leg.task, State.FAILED, error=str(out.stop_reason))
        for other in seq.live_legs():
            self._close_leg(other, abort=True)
        self._move_task(seq, seq.tasks.get(TERole.DECODE), State.ABORTED)
        final = msgspec.structs.replace(out, request_id=seq.request_id, new_token_ids=[], new_logprobs=[])
        self._end(seq, final, emitted)

    def _group_stats(self, populate_latencies: list[float]) -> SchedulerStats | None:
        """Gauges over the live TEs; counters over every TE the group ever had, so they never go back."""
        reports = [te.stats for te in self.tes.values() if te.stats is not None and not te.dead]
        if not reports:
            return None
        gauges = {name: sum(getattr(s, name) for s in reports) for name in _GAUGES}
        counters = {
            name: self._retired_counters[name] + sum(getattr(s, name) for s in reports) for name in _COUNTERS
        }
        return SchedulerStats(
            **gauges,
            **counters,
            kv_cache_usage=sum(s.kv_cache_usage for s in reports) / len(reports),
            populate_latencies=populate_latencies,  # only the batch's own: others' were counted already
        )

    def live_sequences(self) -> int:
        return len(self._seqs)

    def is_alive(self) -> bool:
        return any(not te.dead and te.client.is_alive() for te in self.tes.values())

    def shutdown(self) -> None:
        for task in [*self._pumps, *([self._sweeper] if self._sweeper else [])]:
            task.cancel()
        for te in self.tes.values():
            with contextlib.suppress(Exception):
                te.client.shutdown()


def _routing(request: EngineCoreRequest) -> RoutingRequest:
    return RoutingRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        cache_salt=request.cache_salt,
        expected_output_tokens=request.sampling_params.max_tokens,
        ignore_eos=request.sampling_params.ignore_eos,  # the oracle predictor: max_tokens is the length
    )


def _scheduled(leg: _Leg) -> bool:
    return leg.task is not None and leg.task.state == State.SCHEDULED


def _te_name(te: _TE | None) -> str:
    return te.te_id if te is not None else "-"


def _incarnation(te: _TE) -> int:
    """The TE's incarnation (0 for an engine that is not a platform TE, e.g. in tests)."""
    return int(getattr(getattr(te.client, "info", None), "incarnation", 0))


# Summed over the live TEs (the PD ones where the engine reports them: requests waiting for KV, sending it,
# holding blocks for a decode TE).
_GAUGES = tuple(
    name
    for name in (
        "num_running",
        "num_waiting",
        "outstanding_tokens",
        "pinned_context_tokens",
        "num_kv_waiting",
        "num_kv_sending",
        "num_kv_held",
    )
    if name in SchedulerStats.__struct_fields__
)
_COUNTERS = (
    "num_preemptions_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "prefix_cache_host_hits_total",
    "kv_blocks_evicted_total",
    "host_blocks_evicted_total",
)
