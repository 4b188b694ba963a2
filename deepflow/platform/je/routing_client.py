"""A job executor's view of one TE group as a single engine: route each request to a TE by policy.

`RoutingCoreClient` speaks the `EngineCoreClient` protocol, so `AsyncLLM` and the HTTP edge run over a group
of TEs unchanged. Each TE is an engine behind its own client (today an engine process over ZeroMQ). Per
request the policy (`deepflow.platform.je.policies`) gets a snapshot of the group: every TE's last reported
load, raised by what this JE has routed since (a burst would otherwise all go to the same "least loaded"
TE), and the group's prompt tree, kept in step by the TEs' cache-residency events.

Requests stay with their TE: aborts go there, a context lives on the TE that computed it, and requests naming
it follow. Outputs of all TEs are merged into one stream; their scheduler stats are summed, so the engine
metrics describe the group. When a TE dies, its requests that have not produced a token are sent again to
another TE of the group; those that have end with an abort naming the failure (their tokens reached the
client, so a retry would repeat them). TEs join and leave while it runs (`add_te`, on the cluster manager's
push); with none alive new requests are refused until one joins. Each request is recorded as a job with one
task per sequence (`deepflow.platform.jobs`): the TE of every attempt, the states and their times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from deepflow.engine.contexts import CreateContext
from deepflow.engine.core_client import (
    Command,
    EngineCoreClient,
    EngineDeadError,
    ReleaseContext,
    ResetPrefixCache,
)
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
from deepflow.platform.jobs import TERMINAL, Job, JobTracker, State, Task

logger = logging.getLogger(__name__)


@dataclass
class _TE:
    te_id: str
    client: EngineCoreClient
    stats: SchedulerStats | None = None
    routed_tokens: int = 0  # routed here since its last stats: not in its report yet
    requests: set[str] = field(default_factory=set)
    dead: bool = False
    draining: bool = False  # scaled down: finishes its requests, gets no new ones

    def load(self) -> TELoad:
        healthy = not self.dead and not self.draining and self.client.is_alive()
        return estimated_load(self.te_id, self.stats, self.routed_tokens, healthy)


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
    ) -> None:
        if not clients:
            raise ValueError("a TE group needs at least one TE")
        self.tes = {te_id: _TE(te_id, client) for te_id, client in clients.items()}
        first = next(iter(clients.values()))
        self.max_model_len = min(c.max_model_len for c in clients.values())
        self.eos_token_ids = first.eos_token_ids
        self.model_path: Path = first.model_path
        self.policy = policy
        self.tree = GlobalPromptTree(block_size)
        self.jobs = jobs
        self.model = model
        self._owner: dict[str, _TE] = {}  # live request id -> its TE
        self._requests: dict[str, EngineCoreRequest] = {}  # live requests, kept for a retry elsewhere
        self._streamed: set[str] = set()  # live requests that produced a token
        self._tasks: dict[str, tuple[Job, Task]] = {}  # live request id -> its job and task
        self._context_owner: dict[str, _TE] = {}
        self.contexts = contexts  # where contexts live (shared by the JEs); re-created on use if none pins
        self._recreating: dict[str, str] = {}  # live context-re-creating request id -> its context id
        self._recreations = itertools.count(1)
        self._aborted: set[str] = set()  # live requests the front end aborted
        self._retired_counters = dict.fromkeys(_COUNTERS, 0)  # what TEs that left had counted
        self.decisions: deque[tuple[str, Decision]] = deque(maxlen=4096)  # (request id, decision)
        self.reason_counts: Counter[str] = Counter()  # routing reasons since start (the cluster report)
        self._merged: asyncio.Queue[EngineCoreOutputs | BaseException] | None = None
        self._pumps: list[asyncio.Task[None]] = []

    # ---- membership ------------------------------------------------------------------------------------
    def add_te(self, te_id: str, client: EngineCoreClient) -> None:
        """A TE joined (or came back under a new incarnation): route to it from now on."""
        old = self.tes.get(te_id)
        if old is not None and not old.dead:
            self._publish(self._fail_over(old, "replaced by a new incarnation"))
        te = self.tes[te_id] = _TE(te_id, client)
        if self._merged is not None:
            self._pumps = [task for task in self._pumps if not task.done()]
            self._pumps.append(asyncio.create_task(self._pump(te)))
        logger.info("TE %s joined group %s", te_id, self.model or "-")

    def set_draining(self, te_id: str, draining: bool) -> None:
        """Stop (or resume) routing new requests to a TE; the requests it has run to their end."""
        te = self.tes.get(te_id)
        if te is not None and te.draining != draining:
            te.draining = draining
            logger.info("TE %s of group %s %s", te_id, self.model or "-", "drains" if draining else "serves")

    def _publish(self, item: EngineCoreOutputs | BaseException) -> None:
        if self._merged is not None:
            self._merged.put_nowait(item)

    # ---- routing ---------------------------------------------------------------------------------------
    def route(self, request: EngineCoreRequest, excluded: frozenset[str] = frozenset()) -> Decision:
        """Where a request goes (it is not sent): the TE of the context it names, else the policy's pick
        among the healthy TEs not `excluded`."""
        owner = self._context_holder(request.context_id) if request.context_id is not None else None
        if owner is not None and owner.load().healthy and owner.te_id not in excluded:
            decision = Decision(te_id=owner.te_id, reason=Reason.CONTEXT)
        else:
            loads = [te.load() for te in self.tes.values()]
            if excluded:
                loads = [msgspec.structs.replace(load, healthy=False) if load.te_id in excluded else load
                         for load in loads]  # fmt: skip
            decision = self.policy.select(
                RoutingRequest(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    cache_salt=request.cache_salt,
                    expected_output_tokens=request.sampling_params.max_tokens,
                ),
                GroupSnapshot(tes=loads, tree=self.tree),
            )
        self.decisions.append((request.request_id, decision))
        self.reason_counts[str(decision.reason)] += 1
        return decision

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
        self._recreating[request_id] = record.context_id
        self._owner[request_id] = te
        te.requests.add(request_id)
        te.routed_tokens += len(record.token_ids)
        self._context_owner[record.context_id] = te
        assert self.contexts is not None
        self.contexts.locate(record.context_id, te.te_id, _incarnation(te))
        logger.info("context %s re-created on TE %s (first use since its TE left)", record.context_id,
                    te.te_id)  # fmt: skip

    def _recreated(self, te: _TE, out: EngineCoreOutput) -> None:
        """A re-creating request ended (or its TE died): the context is pinned there, or nowhere."""
        context_id = self._recreating.pop(out.request_id)
        self._owner.pop(out.request_id, None)
        te.requests.discard(out.request_id)
        if out.context_pinned_tokens is None:
            logger.warning("context %s could not be re-created on TE %s: %s", context_id, te.te_id,
                           out.stop_reason)  # fmt: skip
            if self._context_owner.get(context_id) is te:
                del self._context_owner[context_id]
            record = self.contexts.get(context_id) if self.contexts is not None else None
            if record is not None and record.te_id == te.te_id and self.contexts is not None:
                self.contexts.locate(context_id, None, None)

    def te_of(self, request_id: str) -> str | None:
        te = self._owner.get(request_id)
        return te.te_id if te is not None else None

    def add_request(self, request: EngineCoreRequest) -> None:
        job_task = self._tasks.get(request.request_id) or self._new_task(request)
        self._move(job_task, State.QUEUED)
        refused: frozenset[str] = frozenset()  # TEs whose socket refused it (dead, not yet reported so)
        recreate = self._needs_recreate(request)
        while True:
            try:
                decision = self.route(request, refused)
                te = self.tes[decision.te_id]
                if recreate is not None and decision.reason != Reason.CONTEXT:
                    self._recreate(recreate, te)
                    recreate = None
                te.client.add_request(request)
                break
            except EngineDeadError:
                refused |= {te.te_id}
            except NoHealthyTE as exc:
                self._tasks.pop(request.request_id, None)
                self._move(job_task, State.FAILED, error="no task executor of the group is alive")
                raise EngineDeadError(f"no task executor of group {self.model or '-'} is alive") from exc
        if job_task is not None:
            self._tasks[request.request_id] = job_task
        self._move(job_task, State.SCHEDULED, te_id=te.te_id)
        self._requests[request.request_id] = request
        self._owner[request.request_id] = te
        te.requests.add(request.request_id)
        # Work owed until the TE's next report: what it will not find cached, plus the outputs.
        te.routed_tokens += routed_tokens(
            len(request.prompt_token_ids), decision.matched_tokens, request.sampling_params.max_tokens
        )
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

    # ---- jobs ------------------------------------------------------------------------------------------
    def _new_task(self, request: EngineCoreRequest) -> tuple[Job, Task] | None:
        if self.jobs is None:
            return None
        job_id = request.request_id.partition("#")[0]  # the n sequences of a request are one job
        job = self.jobs.get(job_id) or self.jobs.create(job_id, self.model, num_tasks=0, job_id=job_id)
        return job, self.jobs.add_task(job)

    def _move(
        self,
        job_task: tuple[Job, Task] | None,
        state: State,
        *,
        te_id: str | None = None,
        error: str | None = None,
    ) -> None:
        if job_task is None or self.jobs is None:
            return
        job, task = job_task
        self.jobs.move(job, task, state, te_id=te_id, error=error)
        logger.log(
            logging.DEBUG if state in (State.QUEUED, State.RUNNING) else logging.INFO,
            "job=%s task=%s state=%s te=%s%s",
            job.job_id,
            task.task_id,
            state.value,
            te_id or task.te_id or "-",
            f" error={error!r}" if error else "",
        )

    def abort(self, request_ids: list[str]) -> None:
        by_te: dict[str, list[str]] = {}
        for request_id in request_ids:
            te = self._owner.get(request_id)
            if te is not None:
                self._aborted.add(request_id)  # never retried elsewhere: nobody waits for it
                by_te.setdefault(te.te_id, []).append(request_id)
        for te_id, ids in by_te.items():
            self.tes[te_id].client.abort(ids)

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
        """Retry the dead TE's requests that have not streamed on the others; end the rest with an abort."""
        te.dead = True
        with contextlib.suppress(Exception):
            te.client.shutdown()  # its socket: nothing more will be read from this incarnation
        if te.stats is not None:
            for name in _COUNTERS:
                self._retired_counters[name] += getattr(te.stats, name)
        te.stats = None
        self.tree.remove_te(te.te_id)
        for context_id in [c for c, owner in self._context_owner.items() if owner is te]:
            del self._context_owner[context_id]
        ended: list[EngineCoreOutput] = []
        message = f"task executor {te.te_id} failed: {reason}"
        for request_id in sorted(te.requests):
            if request_id in self._recreating:  # pinned nowhere now: the next use re-creates it again
                self._recreated(te, EngineCoreOutput(request_id=request_id, new_token_ids=[],
                                                     stop_reason=message))  # fmt: skip
                continue
            request = self._requests.get(request_id)
            self._owner.pop(request_id, None)
            streamed = request_id in self._streamed
            retry = (
                request is not None
                and (not streamed or request.restartable)
                and request_id not in self._aborted
                and request.create_context is None
            )
            if retry:
                assert request is not None
                try:
                    if streamed:  # its tokens never left the JE: the front end starts it over
                        self._streamed.discard(request_id)
                        if (job_task := self._tasks.get(request_id)) is not None:
                            job_task[1].streamed = False
                        ended.append(
                            EngineCoreOutput(request_id=request_id, new_token_ids=[], restarted=True)
                        )
                    self.add_request(request)
                    logger.warning("request %s retried after TE %s failed", request_id, te.te_id)
                    continue
                except Exception as exc:  # one request's retry failing must not strand the others
                    logger.warning("request %s could not be retried: %s", request_id, exc)
            ended.append(
                EngineCoreOutput(
                    request_id=request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ABORT,
                    stop_reason=message,
                )
            )
            self._end(request_id, te, ended[-1])
        te.requests.clear()
        return EngineCoreOutputs(outputs=ended, stats=self._group_stats([]))

    def _end(self, request_id: str, te: _TE, out: EngineCoreOutput) -> None:
        """Forget a request that finished (or failed); its task takes its final state."""
        job_task = self._tasks.pop(request_id, None)
        if job_task is not None and job_task[1].state not in TERMINAL:
            failed = out.finish_reason == FinishReason.ABORT and request_id not in self._aborted
            if out.finish_reason != FinishReason.ABORT:
                self._move(job_task, State.FINISHED)
            else:
                error = str(out.stop_reason) if out.stop_reason else None
                self._move(job_task, State.FAILED if failed and error else State.ABORTED, error=error)
        self._owner.pop(request_id, None)
        self._requests.pop(request_id, None)
        self._streamed.discard(request_id)
        self._aborted.discard(request_id)
        te.requests.discard(request_id)

    def _absorb(self, te: _TE, batch: EngineCoreOutputs) -> EngineCoreOutputs:
        if batch.stats is not None:
            te.stats = batch.stats
            te.routed_tokens = 0
        for event in batch.kv_events:
            self.tree.apply(msgspec.structs.replace(event, te_id=te.te_id))
        outputs = []
        for out in batch.outputs:
            if self._owner.get(out.request_id) is not te:
                continue  # not (or no longer) this TE's: e.g. retried elsewhere already
            if out.request_id in self._recreating:  # ours, not the front end's
                if out.finish_reason is not None:
                    self._recreated(te, out)
                continue
            outputs.append(out)
            job_task = self._tasks.get(out.request_id)
            if out.new_token_ids:
                self._streamed.add(out.request_id)
                if job_task is not None:
                    job_task[1].streamed = True
            if job_task is not None and job_task[1].state == State.SCHEDULED:
                self._move(job_task, State.RUNNING)
            if out.finish_reason is not None:
                self._end(out.request_id, te, out)
        fresh = batch.stats.populate_latencies if batch.stats is not None else []
        return EngineCoreOutputs(outputs=outputs, stats=self._group_stats(fresh))

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

    def is_alive(self) -> bool:
        return any(not te.dead and te.client.is_alive() for te in self.tes.values())

    def shutdown(self) -> None:
        for task in self._pumps:
            task.cancel()
        for te in self.tes.values():
            with contextlib.suppress(Exception):
                te.client.shutdown()


def _incarnation(te: _TE) -> int:
    """The TE's incarnation (0 for an engine that is not a platform TE, e.g. in tests)."""
    return int(getattr(getattr(te.client, "info", None), "incarnation", 0))


_GAUGES = ("num_running", "num_waiting", "outstanding_tokens", "pinned_context_tokens")
_COUNTERS = (
    "num_preemptions_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "prefix_cache_host_hits_total",
    "kv_blocks_evicted_total",
    "host_blocks_evicted_total",
)
