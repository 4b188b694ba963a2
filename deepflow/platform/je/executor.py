"""The job executor (paper §3, §5): the HTTP edge's view of the cluster, one process of several.

It keeps one `RoutingCoreClient` per model over the model's TE groups (colocated, prefill, decode; one
`RemoteTEClient` per TE, its role from the push) in step with the cluster manager's pushed TE list, serves
each model through an `AsyncLLM` (tokenizes, detokenizes, streams), and records every request as a job
(`JobTracker`, one per JE). It heartbeats the CM every second with the view version it holds, so a restarted
CM re-sends the list; a dead TE is routed around as soon as the CM sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from deepflow.engine.async_llm import AsyncLLM
from deepflow.engine.tokenizer import default_tokenizer_workers
from deepflow.platform import messages as m
from deepflow.platform.cluster.manager import cm_address
from deepflow.platform.je.context_store import ContextStore
from deepflow.platform.je.job_store import JobStore
from deepflow.platform.je.policies import make_policy
from deepflow.platform.je.policies.router import TERole
from deepflow.platform.je.policies.routers import make_router
from deepflow.platform.je.routing_client import RoutingCoreClient
from deepflow.platform.je.te_client import RemoteTEClient
from deepflow.platform.jobs import Job, JobTracker
from deepflow.platform.spec import ClusterSpec

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
JOB_FLUSH_SECONDS = 0.1
FINISHED_JOBS_IN_MEMORY = 256  # the rest are answered from the job store


class JobExecutor:
    def __init__(self, spec: ClusterSpec, je_id: str, run_dir: Path) -> None:
        self.spec = spec
        self.je_id = je_id
        # Finished jobs stay in memory only briefly: every change reaches the shared job store within 100 ms,
        # and lookups of older ones fall back to it. Holding 10,000 (the tracker's default) grew each JE by
        # ~1.8 KB per request over a 30-minute soak (+8% RSS) before the cap would have flattened it.
        self.jobs = JobTracker(max_finished=FINISHED_JOBS_IN_MEMORY)
        self.job_store = JobStore(run_dir / "jobs.db")
        self.context_store = ContextStore(run_dir / "context_locations.db")  # where contexts are pinned
        self.groups: dict[str, RoutingCoreClient] = {}
        self.engines: dict[str, AsyncLLM] = {}
        self._context = zmq.asyncio.Context()
        self._cm = self._context.socket(zmq.DEALER)
        self._cm.setsockopt(zmq.IDENTITY, je_id.encode())
        self._cm.setsockopt(zmq.LINGER, 0)
        self._cm.connect(cm_address(run_dir))
        self._clients: dict[str, RemoteTEClient] = {}  # te id -> its current incarnation's client
        self._known_at: dict[str, float] = {}  # te id -> when this JE connected to its current incarnation
        self._view_version = ""
        self._view_applied = asyncio.Event()
        self._query_ids = itertools.count(1)
        self._queries: dict[int, asyncio.Future[Any]] = {}  # query id -> the CM's answer
        self._tasks: list[asyncio.Task[None]] = []

    # ---- startup ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Wait until every model can serve (a ready colocated TE, or a ready prefill and decode TE), then
        build the groups and engines."""
        self._tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._flush_jobs()),
        ]
        while not self._all_models_ready():
            self._view_applied.clear()
            await self._view_applied.wait()
        workers = self.spec.tokenizer_workers
        workers = default_tokenizer_workers() if workers is None else workers
        for model in self.spec.models:
            clients = {
                te_id: c for te_id, c in self._clients.items() if c.info.model == model.name and c.is_alive()
            }
            policy = make_policy(model.policy)
            group = RoutingCoreClient(
                clients,
                policy,
                block_size=next(iter(clients.values())).info.block_size,
                jobs=self.jobs,
                model=model.name,
                contexts=self.context_store,
                roles={te_id: TERole(c.info.role) for te_id, c in clients.items()},
                router=make_router(model.router, policy, **model.router_params),
                kv_transfer=model.kv_transfer,
            )
            self.groups[model.name] = group
            group.start()  # read every TE from now on: stats and KV events flow before any request
            engine = AsyncLLM(model.engine, group, model_name=model.name, tokenizer_workers=workers)
            engine.start()
            self.engines[model.name] = engine
        logger.info("job executor %s serving %s", self.je_id, ", ".join(self.engines))

    def _all_models_ready(self) -> bool:
        ready = {(c.info.model, c.info.role) for c in self._clients.values() if c.is_alive()}

        def serves(name: str) -> bool:
            return (name, TERole.COLOCATED) in ready or {
                (name, TERole.PREFILL),
                (name, TERole.DECODE),
            } <= ready

        return all(serves(model.name) for model in self.spec.models)

    # ---- the cluster manager ---------------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        while True:
            beat = m.JEHeartbeat(je_id=self.je_id, pid=os.getpid(), view_version=self._view_version)
            try:
                await self._cm.send(m.encoder.encode(beat), flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # no CM right now (restarting): the next beat will do
                logger.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _listen(self) -> None:
        """The CM's messages, one at a time; a bad one is logged and skipped (losing this loop would leave
        the JE routing to TEs it no longer hears about)."""
        while True:
            payload = await self._cm.recv()
            try:
                message = m.from_cm.decode(payload)
                if isinstance(message, m.ClusterView):
                    self.apply_view(message)
                elif isinstance(message, m.ClusterReport | m.ScaleResult):
                    waiter = self._queries.pop(message.query_id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
            except Exception:
                logger.exception("could not apply a message of the cluster manager")

    def apply_view(self, view: m.ClusterView) -> None:
        """Connect to TEs that became ready, stop routing to draining ones, drop those that died, were
        replaced or removed."""
        self._view_version = view.version
        listed = set()
        for te in view.tes:
            listed.add(te.te_id)
            current = self._clients.get(te.te_id)
            group = self.groups.get(te.model)
            same = current is not None and current.info.incarnation == te.incarnation and current.is_alive()
            if te.state == "draining":
                if same and group is not None:
                    group.set_draining(te.te_id, True)
                continue
            if te.state == "ready" and te.info is not None:
                if same:
                    if group is not None:
                        group.set_draining(te.te_id, False)
                    continue
                if current is not None:
                    current.mark_dead(f"replaced by incarnation {te.info.incarnation}")
                    if group is None:
                        current.shutdown()  # no group reads it yet: close it here
                client = RemoteTEClient(te.info, self.je_id, self._context)
                self._clients[te.te_id] = client
                self._known_at[te.te_id] = time.time()
                if group is not None:
                    group.add_te(te.te_id, client, TERole(te.info.role))
                logger.info(
                    "TE %s (model %s, %s, incarnation %d) is ready here",
                    te.te_id,
                    te.model,
                    te.info.role,
                    te.incarnation,
                )
            elif (
                current is not None
                and current.is_alive()
                and (te.state in ("dead", "removed") or te.incarnation != current.info.incarnation)
            ):
                current.mark_dead(f"the cluster manager reports it {te.state}")
        for te_id in set(self._clients) - listed:
            self._clients.pop(te_id).mark_dead("no longer in the cluster")
        self._view_applied.set()

    # ---- the PlatformView the HTTP edge shows ------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        """This JE's live record, else what any JE (this one before a restart included) stored."""
        job = self.jobs.get(job_id)
        return self._job_dict(job) if job is not None else self.job_store.load(job_id)

    def _job_dict(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(job)
        out["job_executor"] = self.je_id
        for task, raw in zip(job.tasks, out["tasks"], strict=True):
            raw["te_id"] = task.te_id
        return out

    def context_location(self, context_id: str) -> str | None:
        """The TE that pins a context now; None when none does yet (its TE left: the next use pins it)."""
        return next(
            (te for group in self.groups.values() if (te := group.context_te(context_id)) is not None), None
        )

    def flush_jobs(self) -> None:
        self.job_store.save(self.je_id, [self._job_dict(job) for job in self.jobs.take_changed()])

    async def _flush_jobs(self) -> None:
        while True:
            await asyncio.sleep(JOB_FLUSH_SECONDS)
            try:
                self.flush_jobs()
            except Exception:  # a busy or broken file must not stop the JE serving
                logger.exception("could not store job records")

    async def _ask(self, message: m.ClusterQuery | m.ScaleGroup, timeout: float) -> Any:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queries[message.query_id] = waiter
        try:
            await self._cm.send(m.encoder.encode(message))
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(f"the cluster manager did not answer within {timeout:.0f} s") from None
        finally:
            self._queries.pop(message.query_id, None)

    async def cluster(self, timeout: float = 2.0) -> dict[str, Any]:
        answer: m.ClusterReport = await self._ask(m.ClusterQuery(query_id=next(self._query_ids)), timeout)
        return self._with_je(answer.report)

    async def scale(
        self, model: str, tes: int, role: str = TERole.COLOCATED, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Ask the CM to run `tes` TEs in `model`'s `role` group; ValueError when it refuses. Returns the
        cluster report."""
        query = m.ScaleGroup(query_id=next(self._query_ids), model=model, tes=tes, role=str(role))
        answer: m.ScaleResult = await self._ask(query, timeout)
        if answer.error is not None:
            raise ValueError(answer.error)
        return self._with_je(answer.report)

    def _with_je(self, report: dict[str, Any]) -> dict[str, Any]:
        report["job_executor"] = {
            "je_id": self.je_id,
            "pid": os.getpid(),
            "view_version": self._view_version,
            # Per model: per-TE reasons (P/D ones prefixed by their role), as before.
            "routing_reasons": {name: dict(group.reason_counts) for name, group in self.groups.items()},
            # Per model: the router's state, every mode/mode_reason count, the latest routes in full.
            "routing": {name: group.report() for name, group in self.groups.items()},
            "connected_tes": {
                te_id: {
                    "incarnation": c.info.incarnation,
                    "role": c.info.role,
                    "known_at": self._known_at[te_id],
                }
                for te_id, c in sorted(self._clients.items())
                if c.is_alive()
            },
        }
        return report

    def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for engine in self.engines.values():
            engine.shutdown()
        with contextlib.suppress(Exception):
            self.flush_jobs()
        self.job_store.close()
        self.context_store.close()
        self._context.destroy(linger=0)
