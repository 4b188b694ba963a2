"""The cluster manager (paper §3): the one owner of TE processes.

It starts every TE of the spec as a local process (each in its model's colocated, prefill or decode group),
keeps a registry of TEs and JEs (SQLite, so a restarted manager adopts the running TEs instead of starting
new ones), watches them (process exit, heartbeats, startup time), restarts a dead TE under a new
incarnation, scales a group (model + role) on command (new TEs start, surplus ones drain and stop), and
pushes the TE list, with each TE's role, to every job executor the moment it changes. A plain loop over one
ROUTER socket: no threads, no asyncio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from deepflow.engine.request import SchedulerStats
from deepflow.platform import messages as m
from deepflow.platform.cluster.drain import DrainCandidate, choose_drain
from deepflow.platform.cluster.registry import Registry, TERow, TEStatus
from deepflow.platform.je.policies.router import TERole
from deepflow.platform.procs import cmdline, kill_quietly, pid_alive
from deepflow.platform.spec import TE_ID_PREFIX, ClusterSpec, ModelSpec, engine_threads, te_cpus

logger = logging.getLogger(__name__)

HEARTBEAT_TIMEOUT = 30.0  # a step on a loaded CPU can take seconds; a hung TE is killed after this
STARTUP_TIMEOUT = 600.0
JE_TIMEOUT = 10.0
STOP_GRACE = 20.0


def cm_address(run_dir: Path) -> str:
    return f"ipc://{run_dir}/cm.sock"


@dataclasses.dataclass
class _TE:
    row: TERow
    spec: ModelSpec
    role: TERole
    process: subprocess.Popen[bytes] | None = None  # None when adopted from an earlier manager
    info: m.TEInfo | None = None
    stats: SchedulerStats | None = None
    identity: bytes | None = None
    last_heartbeat: float = 0.0
    restart_at: float = 0.0
    failures: int = 0  # consecutive deaths soon after start: the restart backoff
    stop_sent: bool = False  # draining: told to stop
    cpu_slot: int = -1  # which run of CPUs its threads are pinned to (spec.te_cpus); -1 until spawned

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return pid_alive(self.row.pid) and self.is_ours()

    def is_ours(self) -> bool:
        """The pid still runs this TE incarnation (not a process that reused the pid)."""
        if self.process is not None:
            return self.process.returncode is None
        args = cmdline(self.row.pid)
        return _flag(args, "--te-id") == self.row.te_id and _flag(args, "--incarnation") == str(
            self.row.incarnation
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.is_ours():
            kill_quietly(self.row.pid, sig)

    def exit_note(self) -> str:
        if self.process is not None and self.process.returncode is not None:
            return f"exited with code {self.process.returncode}"
        return "exited"


@dataclasses.dataclass
class _JE:
    je_id: str
    pid: int
    last_seen: float


class ClusterManager:
    def __init__(
        self, spec: ClusterSpec, run_dir: Path, lifeline_fd: int | None = None, log_level: str = "info"
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.lifeline_fd = lifeline_fd
        self.log_level = log_level
        self.started_at = time.time()
        self.stopping = False
        self.registry = Registry(run_dir / "cluster.db")
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(cm_address(run_dir))
        self._epoch = f"{os.getpid()}.{int(self.started_at * 1000)}"
        self._changes = 0
        self.version = f"{self._epoch}:0"
        self.tes: dict[str, _TE] = {}
        self.jes: dict[bytes, _JE] = {}
        self._adopt_or_start()

    # ---- TE lifecycle ----------------------------------------------------------------------------------
    def _adopt_or_start(self) -> None:
        rows = {row.te_id: row for row in self.registry.tes()}
        names = {model.name for model in self.spec.models}
        live = [
            row
            for row in rows.values()
            if row.state not in (TEStatus.STOPPED, TEStatus.REMOVED) and row.model in names
        ]
        # A restarted manager: the registry, not the spec, says which TEs exist (scaling may have changed it).
        members = (
            [(row.te_id, self.spec.model(row.model), TERole(row.role)) for row in live]
            if live
            else self.spec.te_ids()
        )
        for te_id, model, role in members:
            row = rows.get(te_id)
            adopted = (
                _TE(row=row, spec=model, role=role, last_heartbeat=time.monotonic())
                if row is not None
                else None
            )
            if (
                adopted is not None
                and adopted.row.state in (TEStatus.STARTING, TEStatus.READY, TEStatus.DRAINING)
                and adopted.alive()
            ):
                # It keeps running; its next heartbeat (within a second) makes it ready again here.
                if adopted.row.state != TEStatus.DRAINING:
                    adopted.row.state = TEStatus.STARTING
                self.tes[te_id] = adopted
                logger.info(
                    "adopted TE %s (pid %s, incarnation %d)", te_id, adopted.row.pid, adopted.row.incarnation
                )
                continue
            if row is not None and row.state == TEStatus.DRAINING:
                row.state = TEStatus.REMOVED  # it was on its way out anyway
                self.registry.save_te(row)
                continue
            self._add(te_id, model, role, row)
        self._changed()

    def _add(self, te_id: str, model: ModelSpec, role: TERole, previous: TERow | None = None) -> _TE:
        """Start TE `te_id` of `model`'s `role` group (a new one, or the next incarnation of `previous`)."""
        fresh = TERow(
            te_id=te_id,
            model=model.name,
            role=role,
            incarnation=previous.incarnation if previous else 0,
            state=TEStatus.DEAD,
            pid=None,
            address="",
            restarts=previous.restarts if previous else 0,
        )
        te = self.tes[te_id] = _TE(row=fresh, spec=model, role=role)
        self._spawn(te)
        return te

    # ---- scaling ---------------------------------------------------------------------------------------
    def _active(self, model_name: str, role: TERole) -> list[_TE]:
        """The group's TEs that serve or will (starting, ready, or dead and about to restart)."""
        return [
            te
            for te in self.tes.values()
            if te.spec.name == model_name
            and te.role == role
            and te.row.state in (TEStatus.STARTING, TEStatus.READY, TEStatus.DEAD)
        ]

    def scale(self, model_name: str, tes: int, role: str = TERole.COLOCATED) -> str | None:
        """Run `tes` TEs in the model's `role` group: start new ones, or drain the surplus (`choose_drain`:
        those not ready, then those pinning no contexts, then the least loaded). A drained TE's contexts are
        pinned again on a survivor by the first request that uses them (the JEs' `ContextStore`). A group may
        go to zero while the model keeps a way to serve (a colocated TE, or prefill and decode TEs). Returns
        an error, or None."""
        if model_name not in {m.name for m in self.spec.models}:
            return f"unknown model {model_name!r}"
        try:
            group = TERole(role)
        except ValueError:
            return f"unknown role {role!r}; choose from {[str(r) for r in TERole]}"
        if tes < 0:
            return f"tes must be >= 0, got {tes}"
        after = {r: len(self._active(model_name, r)) for r in TERole} | {group: tes}
        if after[TERole.COLOCATED] < 1 and min(after[TERole.PREFILL], after[TERole.DECODE]) < 1:
            return (
                f"model {model_name} would be left without a way to serve: it needs a colocated TE, or "
                "prefill and decode TEs (scale to zero is not supported)"
            )
        active = self._active(model_name, group)
        model = self.spec.model(model_name)
        for _ in range(tes - len(active)):
            te = self._add(self._next_te_id(group), model, group)
            logger.info("scaling %s/%s up: TE %s", model_name, group, te.row.te_id)
        candidates = [
            DrainCandidate(
                te_id=te.row.te_id,
                serving=te.row.state == TEStatus.READY,
                pinned_context_tokens=te.stats.pinned_context_tokens if te.stats is not None else 0,
                outstanding_tokens=_outstanding(te.stats),
                started_at=te.row.started_at or 0.0,
            )
            for te in active
        ]
        for te_id in choose_drain(candidates, keep=tes):
            te = self.tes[te_id]
            logger.info("scaling %s/%s down: TE %s drains", model_name, group, te.row.te_id)
            if te.row.state == TEStatus.READY:
                te.row.state = TEStatus.DRAINING
            else:  # not serving anything yet
                te.kill()
                te.row.state = TEStatus.REMOVED
            self.registry.save_te(te.row)
        self._changed()
        return None

    def _next_te_id(self, role: TERole) -> str:
        """The next free id of the role's series (te-N, te-pN, te-dN): never one used before, even by a
        removed TE, so a job record's TE id names one TE."""
        prefix = TE_ID_PREFIX[role]
        used = {
            t[len(prefix) :]
            for t in {*self.tes, *(r.te_id for r in self.registry.tes())}
            if t.startswith(prefix)
        }
        numbers = {int(n) for n in used if n.isdigit()}
        return f"{prefix}{max(numbers, default=-1) + 1}"

    def _spawn(self, te: _TE) -> None:
        incarnation = te.row.incarnation + 1
        address = f"ipc://{self.run_dir}/{te.row.te_id}.{incarnation}.sock"
        threads = te.spec.engine.num_threads or engine_threads(self.spec)
        if te.cpu_slot < 0:
            taken = {t.cpu_slot for t in self.tes.values() if t is not te and t.row.state != TEStatus.REMOVED}
            te.cpu_slot = min(set(range(len(self.tes) + 1)) - taken)
        engine = dataclasses.replace(
            te.spec.engine_for(te.role),  # P and D TEs: KV transfer on
            num_threads=threads,
            cpu_ids=te.spec.engine.cpu_ids or te_cpus(te.cpu_slot, threads, sorted(os.sched_getaffinity(0))),
            kv_events=True,
        )
        command = [
            sys.executable,
            "-m",
            "deepflow.platform.te",
            "--te-id",
            te.row.te_id,
            "--incarnation",
            str(incarnation),
            "--model-name",
            te.spec.name,
            "--engine-config",
            _json(engine),
            "--cm-address",
            cm_address(self.run_dir),
            "--address",
            address,
            "--log-level",
            self.log_level,
        ]
        pass_fds: tuple[int, ...] = ()
        if self.lifeline_fd is not None:
            command += ["--lifeline-fd", str(self.lifeline_fd)]
            pass_fds = (self.lifeline_fd,)
        te.info = te.stats = te.identity = None
        te.row = TERow(
            te_id=te.row.te_id,
            model=te.spec.name,
            role=te.role,
            incarnation=incarnation,
            state=TEStatus.STARTING,
            pid=None,
            address=address,
            restarts=te.row.restarts + (1 if incarnation > 1 else 0),
            started_at=time.time(),
        )
        # Recorded before it exists: a manager dying right after the spawn never reuses this incarnation.
        self.registry.save_te(te.row)
        te.process = subprocess.Popen(command, pass_fds=pass_fds, start_new_session=True)
        te.row.pid = te.process.pid
        self.registry.save_te(te.row)
        logger.info("started TE %s (model %s, %s, pid %d, incarnation %d)", te.row.te_id, te.spec.name,
                    te.role, te.process.pid, incarnation)  # fmt: skip

    def _died(self, te: _TE, reason: str) -> None:
        lived = time.time() - (te.row.ready_at or te.row.started_at or time.time())
        te.failures = te.failures + 1 if te.row.ready_at is None or lived < 60 else 0
        delay = min(30.0, 0.25 * 2**te.failures)
        te.restart_at = time.monotonic() + delay
        te.row.state = TEStatus.DEAD
        te.stats = None
        self.registry.save_te(te.row)
        logger.warning("TE %s (pid %s) %s; restarting in %.1f s", te.row.te_id, te.row.pid, reason, delay)
        self._changed()

    def _check_tes(self) -> None:
        now = time.monotonic()
        for te in self.tes.values():
            state = te.row.state
            if state in (TEStatus.STARTING, TEStatus.READY):
                if not te.alive():
                    self._died(te, te.exit_note())
                elif state == TEStatus.READY and now - te.last_heartbeat > HEARTBEAT_TIMEOUT:
                    te.kill()
                    self._died(te, f"sent no heartbeat for {HEARTBEAT_TIMEOUT:.0f} s (killed)")
                elif (
                    state == TEStatus.STARTING
                    and te.process is not None
                    and time.time() - (te.row.started_at or 0) > STARTUP_TIMEOUT
                ):
                    te.kill()
                    self._died(te, f"did not become ready within {STARTUP_TIMEOUT:.0f} s (killed)")
                elif state == TEStatus.STARTING and te.process is None and self._adopted_silent(te, now):
                    te.kill()
                    self._died(te, "was adopted but never reported (killed)")
            elif state == TEStatus.DRAINING:
                self._drain(te)
            elif (
                state in (TEStatus.DEAD, TEStatus.REMOVED)
                and te.process is not None
                and te.process.returncode is None
            ):
                te.process.poll()  # reap a TE we killed, so it is no zombie until the restart
            if te.row.state == TEStatus.DEAD and not self.stopping and now >= te.restart_at:
                self._spawn(te)
                self._changed()

    def _drain(self, te: _TE) -> None:
        """A draining TE gets no new requests (the JEs know); once it reports none running or waiting it is
        stopped, and once it exited it is removed."""
        if not te.alive():
            te.row.state = TEStatus.REMOVED
            self.registry.save_te(te.row)
            logger.info("TE %s drained and stopped", te.row.te_id)
            self._changed()
        elif time.monotonic() - te.last_heartbeat > HEARTBEAT_TIMEOUT:
            te.kill()  # hung while draining: removed at the next check
        elif not te.stop_sent and te.stats is not None and _busy(te.stats) == 0:
            te.stop_sent = True
            if te.identity is not None:
                self._send(te.identity, m.StopTE())
            te.kill(signal.SIGTERM)

    @staticmethod
    def _adopted_silent(te: _TE, now: float) -> bool:
        """An adopted TE that was ready reports within a heartbeat timeout; one that was still loading its
        model gets what is left of the startup timeout."""
        if te.row.ready_at is not None:
            return now - te.last_heartbeat > HEARTBEAT_TIMEOUT
        return time.time() - (te.row.started_at or 0) > STARTUP_TIMEOUT

    def _on_te_heartbeat(self, identity: bytes, beat: m.TEHeartbeat) -> None:
        info = beat.info
        te = self.tes.get(info.te_id)
        if (
            te is None
            or info.incarnation != te.row.incarnation
            or te.row.state in (TEStatus.DEAD, TEStatus.REMOVED)
        ):
            logger.warning(
                "stopping stray TE %s incarnation %d (pid %d)", info.te_id, info.incarnation, info.pid
            )
            self._send(identity, m.StopTE())
            return
        # The role is the spec's (this manager's) word, whatever the TE says: JEs route by it.
        info = msgspec.structs.replace(info, role=str(te.role)) if info.role != te.role else info
        te.info, te.stats, te.identity = info, beat.stats, identity
        te.last_heartbeat = time.monotonic()
        if te.row.state == TEStatus.STARTING:
            te.row.incarnation, te.row.pid, te.row.address = info.incarnation, info.pid, info.address
            te.row.state = TEStatus.READY
            te.row.ready_at = te.row.ready_at if te.process is None and te.row.ready_at else time.time()
            self.registry.save_te(te.row)
            took = te.row.ready_at - (te.row.started_at or te.row.ready_at)
            logger.info("TE %s ready (pid %d, %.1f s after start)", info.te_id, info.pid, took)
            self._changed()

    # ---- job executors ---------------------------------------------------------------------------------
    def _on_je_heartbeat(self, identity: bytes, beat: m.JEHeartbeat) -> None:
        if identity not in self.jes:
            logger.info("job executor %s (pid %d) joined", beat.je_id, beat.pid)
            self.registry.save_je(beat.je_id, beat.pid)
        self.jes[identity] = _JE(beat.je_id, beat.pid, time.monotonic())
        if beat.view_version != self.version:
            self._send(identity, self._view())

    def _prune_jes(self) -> None:
        now = time.monotonic()
        for identity in [i for i, je in self.jes.items() if now - je.last_seen > JE_TIMEOUT]:
            logger.warning("job executor %s went silent", self.jes.pop(identity).je_id)

    def _view(self) -> m.ClusterView:
        return m.ClusterView(
            version=self.version,
            tes=[
                m.TEState(
                    te_id=te.row.te_id,
                    model=te.spec.name,
                    role=str(te.role),
                    incarnation=te.row.incarnation,
                    state=te.row.state,
                    pid=te.row.pid,
                    info=te.info if te.row.state in (TEStatus.READY, TEStatus.DRAINING) else None,
                )
                for te in self.tes.values()
            ],
        )

    def _changed(self) -> None:
        """Push the new TE list to every JE now: they must not route to a dead TE a moment longer."""
        self._changes += 1
        self.version = f"{self._epoch}:{self._changes}"
        view = self._view()
        for identity in self.jes:
            self._send(identity, view)

    def _send(self, identity: bytes, message: Any) -> None:
        try:
            self._socket.send_multipart([identity, m.encoder.encode(message)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.debug("could not send to %r: %s", identity, exc)

    # ---- reports ---------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        tes = []
        for te in self.tes.values():
            s = te.stats
            tes.append(
                {
                    "te_id": te.row.te_id,
                    "model": te.spec.name,
                    "role": str(te.role),
                    "state": te.row.state,
                    "pid": te.row.pid,
                    "host": te.info.host if te.info else None,
                    "address": te.row.address,
                    "incarnation": te.row.incarnation,
                    "restarts": te.row.restarts,
                    "started_at": te.row.started_at,
                    "ready_at": te.row.ready_at,
                    "heartbeat_age_s": round(now - te.last_heartbeat, 3) if te.last_heartbeat else None,
                    "load": _load(s),
                    "kv_usage": s.kv_cache_usage if s else None,
                    "prefix_cache_hit_rate": _hit_rate([s] if s else []),
                    "pinned_context_tokens": s.pinned_context_tokens if s else None,
                    "num_kv_blocks": te.info.num_kv_blocks if te.info else None,
                }
            )
        groups = []
        for model, role in self._groups():
            members = [te for te in self.tes.values() if te.spec.name == model.name and te.role == role]
            stats = [te.stats for te in members if te.stats is not None and te.row.state == TEStatus.READY]
            groups.append(
                {
                    "model": model.name,
                    "role": str(role),
                    "policy": model.policy,
                    "router": model.router,
                    "tes": [te.row.te_id for te in members if te.row.state != TEStatus.REMOVED],
                    "ready": sum(te.row.state == TEStatus.READY for te in members),
                    "load": _sum_load(stats),
                    "kv_usage": sum(s.kv_cache_usage for s in stats) / len(stats) if stats else None,
                    "prefix_cache_hit_rate": _hit_rate(stats),
                }
            )
        return {
            "cluster_manager": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "view_version": self.version,
            },
            "groups": groups,
            "tes": tes,
            "job_executors": [
                {"je_id": je.je_id, "pid": je.pid, "heartbeat_age_s": round(now - je.last_seen, 3)}
                for je in self.jes.values()
            ],
        }

    def _groups(self) -> list[tuple[ModelSpec, TERole]]:
        """Every (model, role) group: the spec's, and any a scale command created since."""
        present = {(te.spec.name, te.role) for te in self.tes.values() if te.row.state != TEStatus.REMOVED}
        return [
            (model, role)
            for model in self.spec.models
            for role in TERole
            if model.group_tes(role) > 0 or (model.name, role) in present
        ]

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> int:
        while not self.stopping:
            if self._socket.poll(100):
                while True:
                    try:
                        identity, payload = self._socket.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(identity, payload)
            self._check_tes()
            self._prune_jes()
        self._stop_tes()
        return 0

    def _handle(self, identity: bytes, payload: bytes) -> None:
        try:
            message = m.to_cm.decode(payload)
        except Exception as exc:  # a bad message must not take the manager down
            logger.warning("undecodable message from %r: %s", identity, exc)
            return
        if isinstance(message, m.TEHeartbeat):
            self._on_te_heartbeat(identity, message)
        elif isinstance(message, m.JEHeartbeat):
            self._on_je_heartbeat(identity, message)
        elif isinstance(message, m.ClusterQuery):
            self._send(identity, m.ClusterReport(query_id=message.query_id, report=self.report()))
        elif isinstance(message, m.ScaleGroup):
            error = self.scale(message.model, message.tes, message.role)
            self._send(identity, m.ScaleResult(query_id=message.query_id, error=error, report=self.report()))

    def stop(self) -> None:
        self.stopping = True

    def _stop_tes(self) -> None:
        """StopTE (and SIGTERM) to every TE, wait for them to exit, kill what is left."""
        live = [
            te
            for te in self.tes.values()
            if te.row.state in (TEStatus.STARTING, TEStatus.READY, TEStatus.DRAINING) and te.alive()
        ]
        for te in live:
            if te.identity is not None:
                self._send(te.identity, m.StopTE())
            te.kill(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(te.alive() for te in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        for te in live:
            if te.alive():
                logger.warning("TE %s did not stop in %.0f s; killing it", te.row.te_id, STOP_GRACE)
                te.kill()
        for te in self.tes.values():
            if te.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    te.process.wait(timeout=5)
            te.row.state = TEStatus.STOPPED
            self.registry.save_te(te.row)
        self.registry.close()
        self._context.destroy(linger=0)
        logger.info("cluster manager stopped %d TEs", len(live))


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


def _json(engine: Any) -> str:
    import msgspec

    return msgspec.json.encode(engine).decode()


def _outstanding(s: SchedulerStats | None) -> int:
    return s.outstanding_tokens if s is not None else 0


# A P/D TE's disaggregated work beside its running and waiting requests (where the engine reports it):
# decode requests waiting for KV, prefill requests sending it, blocks a transfer may still touch.
_KV_GAUGES = {"kv_waiting": "num_kv_waiting", "kv_sending": "num_kv_sending", "kv_held": "num_kv_held"}


def _busy(s: SchedulerStats) -> int:
    """Requests a draining TE still serves: it stops only when none is left (a prefill TE's blocks held for a
    decode TE included, so no transfer is cut short)."""
    return s.num_running + s.num_waiting + sum(getattr(s, field, 0) for field in _KV_GAUGES.values())


def _load(s: SchedulerStats | None) -> dict[str, int] | None:
    if s is None:
        return None
    load = {"running": s.num_running, "waiting": s.num_waiting, "outstanding_tokens": s.outstanding_tokens}
    return load | {key: getattr(s, field, 0) for key, field in _KV_GAUGES.items()}


def _sum_load(stats: list[SchedulerStats]) -> dict[str, int]:
    loads = [_load(s) or {} for s in stats]
    keys = ["running", "waiting", "outstanding_tokens", *_KV_GAUGES]
    return {key: sum(load.get(key, 0) for load in loads) for key in keys}


def _hit_rate(stats: list[SchedulerStats]) -> float | None:
    queries = sum(s.prefix_cache_queries_total for s in stats)
    return sum(s.prefix_cache_hits_total for s in stats) / queries if queries else None
