"""The serverless abstraction (paper §3): an HTTP request becomes one or more jobs, each split into tasks.

A chat or completion request on a colocated TE is one job with one task per sequence; prefill/decode
disaggregation makes that two (a "prefill" task on a prefill TE, a "decode" task on a decode TE, each with
its own states, TE and attempts); batch inference many. These objects are the job executor's record of a
request's life: states with the time each was entered, and the TE every task ran on (a retried task keeps
its earlier attempts). Pure data and transition rules: no I/O, so the simulator drives the same objects.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable

import msgspec


class State(enum.StrEnum):
    CREATED = "created"
    QUEUED = "queued"  # waiting for a TE
    SCHEDULED = "scheduled"  # a TE was chosen; the task is on its way
    RUNNING = "running"  # the TE accepted it (first output seen)
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    RETRIED = "retried"  # its sequence was retried in another mode (new tasks took over its work)


TERMINAL = frozenset({State.FINISHED, State.FAILED, State.ABORTED, State.RETRIED})

# Allowed transitions; a task goes back to QUEUED when its TE dies before it streamed anything (retry).
_NEXT: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.QUEUED, State.ABORTED, State.FAILED}),
    State.QUEUED: frozenset({State.SCHEDULED, State.ABORTED, State.FAILED, State.RETRIED}),
    State.SCHEDULED: frozenset(
        {State.RUNNING, State.QUEUED, State.FINISHED, State.ABORTED, State.FAILED, State.RETRIED}
    ),
    State.RUNNING: frozenset({State.QUEUED, State.FINISHED, State.ABORTED, State.FAILED, State.RETRIED}),
}


class InvalidTransition(RuntimeError):
    pass


class Attempt(msgspec.Struct, kw_only=True):
    te_id: str
    scheduled_at: float
    ended_at: float | None = None
    # "finished", "te_died", "aborted", "kv_timeout" / "kv_transfer" (a disaggregated leg's transfer failed),
    # "peer_failed" (the other task of its disaggregated pair failed), "retried"
    outcome: str | None = None


class Task(msgspec.Struct, kw_only=True):
    task_id: str
    kind: str = "colocated"  # "colocated", "prefill", "decode" (TERole); later "batch-item"
    sequence_id: str = ""  # the sequence it serves (a request with n > 1 has n; its id has a #i suffix)
    state: State = State.CREATED
    history: list[tuple[State, float]] = msgspec.field(default_factory=list)
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    error: str | None = None
    streamed: bool = False  # tokens reached the client: a retry would duplicate them

    @property
    def te_id(self) -> str | None:
        return self.attempts[-1].te_id if self.attempts else None


class Job(msgspec.Struct, kw_only=True):
    job_id: str
    request_id: str
    model: str
    tasks: list[Task]
    state: State = State.CREATED
    history: list[tuple[State, float]] = msgspec.field(default_factory=list)


class JobTracker:
    """Creates jobs and moves tasks through their states; the job's state follows its tasks.

    Finished jobs are kept for inspection (`GET /v1/jobs/{id}`) until `max_finished` newer ones have ended."""

    def __init__(self, clock: Callable[[], float] = time.time, max_finished: int = 10_000) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self.jobs: dict[str, Job] = {}
        self.max_finished = max_finished
        self._finished: deque[str] = deque()
        self.changed: set[str] = set()  # job ids changed since the last `take_changed` (for a job store)

    def create(
        self,
        request_id: str,
        model: str,
        num_tasks: int = 1,
        kind: str = "colocated",
        *,
        job_id: str | None = None,
    ) -> Job:
        """A new job for `request_id`; its id is `job_id` (the API uses the response id) or job-N."""
        now = self._clock()
        job_id = job_id or f"job-{next(self._ids)}"
        if job_id in self.jobs:
            raise ValueError(f"job id {job_id!r} is already in use")
        job = Job(job_id=job_id, request_id=request_id, model=model, tasks=[], history=[(State.CREATED, now)])
        for _ in range(num_tasks):
            self.add_task(job, kind)
        self.jobs[job_id] = job
        self.changed.add(job_id)
        return job

    def add_task(self, job: Job, kind: str = "colocated", *, sequence_id: str = "") -> Task:
        task = Task(
            task_id=f"{job.job_id}.{len(job.tasks)}",
            kind=kind,
            sequence_id=sequence_id or job.request_id,
            history=[(State.CREATED, self._clock())],
        )
        job.tasks.append(task)
        return task

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def move(
        self,
        job: Job,
        task: Task,
        state: State,
        *,
        te_id: str | None = None,
        error: str | None = None,
        outcome: str | None = None,
    ) -> None:
        """Move `task` to `state`; a running attempt that ends records `outcome` (default: "te_died" for a
        task queued again, else the state)."""
        if state not in _NEXT.get(task.state, frozenset()):
            raise InvalidTransition(f"task {task.task_id}: {task.state} -> {state}")
        if state == State.QUEUED and task.streamed:
            raise InvalidTransition(f"task {task.task_id} already streamed tokens: it cannot be retried")
        if state == State.SCHEDULED and te_id is None:
            raise ValueError("a scheduled task names its TE")
        now = self._clock()
        if task.attempts and task.attempts[-1].ended_at is None and state in (State.QUEUED, *TERMINAL):
            attempt = task.attempts[-1]
            attempt.ended_at = now
            attempt.outcome = outcome or ("te_died" if state == State.QUEUED else state.value)
        if state == State.SCHEDULED:
            assert te_id is not None
            task.attempts.append(Attempt(te_id=te_id, scheduled_at=now))
        task.state = state
        task.history.append((state, now))
        task.error = error if error is not None else task.error
        self._follow(job, now)
        self.changed.add(job.job_id)

    def _follow(self, job: Job, now: float) -> None:
        # A retried task's work moved to another: it no longer speaks for the job.
        states = {t.state for t in job.tasks if t.state != State.RETRIED} or {State.RETRIED}
        if states == {State.RETRIED}:
            new = State.QUEUED
        elif states <= TERMINAL:
            new = next((s for s in (State.FAILED, State.ABORTED) if s in states), State.FINISHED)
        elif State.RUNNING in states:
            new = State.RUNNING
        elif State.SCHEDULED in states:
            new = State.SCHEDULED
        else:
            new = State.QUEUED
        if new != job.state:
            job.state = new
            job.history.append((new, now))
            if new in TERMINAL:
                self._finished.append(job.job_id)
                # Never drop a record whose last change has not been taken yet (the JE's job store would
                # miss its end); the next finish evicts it once it has been.
                while len(self._finished) > self.max_finished and self._finished[0] not in self.changed:
                    self.jobs.pop(self._finished.popleft(), None)

    def take_changed(self) -> list[Job]:
        """The jobs changed since the last call that are still held."""
        changed, self.changed = self.changed, set()
        return [job for job_id in changed if (job := self.jobs.get(job_id)) is not None]

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
