"""Keeps every unfinished fine-tuning job running: one worker process per job, restarted when it dies.

Any number of job executors may run a manager over the same SQLite file: a job's worker is claimed in a
transaction (its pid and host go into the record), and a manager starts one only when the recorded worker
is not alive — so two JEs never train the same job twice, and a JE that dies leaves its workers running
(they are their own processes) for whichever manager looks next. A job whose stages were attempted
`max_restarts` times fails with the last reason instead of restarting forever.

`max_workers` bounds the concurrent trainings per host (serving keeps the rest of the CPUs). Pausing a
training for a serving burst — the paper's Challenge 1, the cluster manager taking the CPUs back and the
job resuming from its checkpoint — is the next step; the trainer already stops at a micro-step boundary
with a checkpoint and resumes exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from deepflow.finetune.jobs import FineTuneJob, FineTuneStore, FTStatus, StageState
from deepflow.platform.procs import cmdline, pid_alive

__all__ = ["FineTuneManager"]

logger = logging.getLogger("deepflow.finetune")


class FineTuneManager:
    def __init__(
        self, home: Path, store: FineTuneStore, *, max_workers: int = 1, max_restarts: int = 3
    ) -> None:
        self.home = Path(home)
        self.store = store
        self.max_workers = max_workers
        self.max_restarts = max_restarts
        self.host = socket.gethostname()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def _alive(self, job: FineTuneJob) -> bool:
        pid = job.worker_pid
        if not pid:
            return False
        if job.worker_host != self.host:
            return True  # another host's worker: that host's manager watches it (one host today)
        if pid == -1:
            return False  # a claim whose process never started (its manager died in between)
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        return pid_alive(pid) and job.id in cmdline(pid)

    def poll(self) -> list[str]:
        """Start workers for unfinished jobs without one (within `max_workers`); returns the started ids."""
        started = []
        running = sum(1 for p in self._procs.values() if p.poll() is None)
        for job in self.store.unfinished():
            if job.cancel_requested and not self._alive(job):
                self.store.update(job.id, _cancel_now)
                continue
            if self._alive(job) or running >= self.max_workers:
                continue
            if job.worker_pid is not None:  # it had a worker, which is gone with the job unfinished
                job = self.store.update(job.id, _count_restart)
            if job.worker_restarts > self.max_restarts:
                reason = (
                    next((r.error for r in job.stages.values() if r.error), None) or "its worker kept dying"
                )
                self.store.update(job.id, lambda j, r=reason: _fail(j, r, self.store.now()))
                self.store.event(
                    job.id, "error", f"Giving up after {job.worker_restarts - 1} restarts: {reason}"
                )
                continue
            if self._start(job):
                started.append(job.id)
                running += 1
        return started

    def _start(self, job: FineTuneJob) -> bool:
        command = [
            sys.executable,
            "-m",
            "deepflow.finetune.worker",
            "--job-id",
            job.id,
            "--home",
            str(self.home),
        ]
        claimed = [False]

        def claim(j: FineTuneJob) -> None:
            if not self._alive(j):  # re-checked inside the transaction: another manager may have won
                j.worker_pid = -1  # placeholder until the process exists
                j.worker_host = self.host
                claimed[0] = True

        self.store.update(job.id, claim)
        if not claimed[0]:
            return False
        log = open(self.home / "fine_tuning" / f"{job.id}.log", "ab")  # noqa: SIM115 — the child keeps it
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs[job.id] = proc
        self.store.update(job.id, lambda j: setattr(j, "worker_pid", proc.pid))
        logger.info("fine-tuning job %s: worker pid %d", job.id, proc.pid)
        return True

    def cancel(self, job_id: str) -> FineTuneJob:
        """Ask the job to stop: a running worker stops at its next micro-step; a queued job ends at once."""
        job = self.store.update(job_id, lambda j: setattr(j, "cancel_requested", True))
        if not job.status.terminal and not self._alive(job):
            job = self.store.update(job_id, _cancel_now)
        return job

    def shutdown(self, *, stop_workers: bool = False) -> None:
        for proc in self._procs.values():
            if stop_workers and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        self._procs.clear()


def _count_restart(job: FineTuneJob) -> None:
    job.worker_restarts += 1
    job.worker_pid = job.worker_host = None


def _cancel_now(job: FineTuneJob) -> None:
    if job.status.terminal:
        return
    job.status = FTStatus.CANCELLED
    for rec in job.stages.values():
        if rec.state in (StageState.PENDING, StageState.RUNNING):
            rec.state = StageState.CANCELLED


def _fail(job: FineTuneJob, reason: str, now: float) -> None:
    job.status = FTStatus.FAILED
    job.finished_at = now
    job.error = {"code": "worker_failed", "message": reason, "param": None}
