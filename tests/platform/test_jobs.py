"""Request → job → task bookkeeping: states, timestamps, attempts per TE, retry rules."""

from __future__ import annotations

import itertools

import pytest

from deepflow.platform.jobs import InvalidTransition, JobTracker, State


def tracker() -> JobTracker:
    ticks = itertools.count(100)
    return JobTracker(clock=lambda: float(next(ticks)))


def test_a_task_runs_to_completion_and_the_job_follows() -> None:
    jobs = tracker()
    job = jobs.create("req-1", "smol")
    task = job.tasks[0]
    for state, te in ((State.QUEUED, None), (State.SCHEDULED, "te-0"), (State.RUNNING, None)):
        jobs.move(job, task, state, te_id=te)
        assert job.state == state
    jobs.move(job, task, State.FINISHED)
    assert job.state == State.FINISHED
    assert [s for s, _ in task.history] == ["created", "queued", "scheduled", "running", "finished"]
    assert [t for _, t in task.history] == sorted(t for _, t in task.history)
    assert task.te_id == "te-0" and task.attempts[0].outcome == "finished"


def test_a_task_whose_te_died_before_streaming_is_retried_elsewhere() -> None:
    jobs = tracker()
    job = jobs.create("req-1", "smol")
    task = job.tasks[0]
    jobs.move(job, task, State.QUEUED)
    jobs.move(job, task, State.SCHEDULED, te_id="te-0")
    jobs.move(job, task, State.QUEUED)  # te-0 died
    jobs.move(job, task, State.SCHEDULED, te_id="te-1")
    assert [(a.te_id, a.outcome) for a in task.attempts] == [("te-0", "te_died"), ("te-1", None)]
    assert task.te_id == "te-1"


def test_a_task_that_streamed_cannot_be_retried() -> None:
    jobs = tracker()
    job = jobs.create("req-1", "smol")
    task = job.tasks[0]
    jobs.move(job, task, State.QUEUED)
    jobs.move(job, task, State.SCHEDULED, te_id="te-0")
    jobs.move(job, task, State.RUNNING)
    task.streamed = True
    with pytest.raises(InvalidTransition, match="streamed"):
        jobs.move(job, task, State.QUEUED)
    jobs.move(job, task, State.FAILED, error="te-0 died mid-stream")
    assert job.state == State.FAILED and task.error == "te-0 died mid-stream"


def test_illegal_transitions_are_refused() -> None:
    jobs = tracker()
    job = jobs.create("req-1", "smol")
    with pytest.raises(InvalidTransition):
        jobs.move(job, job.tasks[0], State.RUNNING)
    jobs.move(job, job.tasks[0], State.QUEUED)
    with pytest.raises(ValueError, match="names its TE"):
        jobs.move(job, job.tasks[0], State.SCHEDULED)
    assert job.tasks[0].state == State.QUEUED and not job.tasks[0].attempts


def test_a_job_of_several_tasks_fails_if_any_fails() -> None:
    jobs = tracker()
    job = jobs.create("req-1", "smol", num_tasks=2, kind="batch-item")
    first, second = job.tasks
    jobs.move(job, first, State.ABORTED)
    assert job.state == State.QUEUED  # one task still to run
    jobs.move(job, second, State.FAILED)
    assert job.state == State.FAILED


def _finish(jobs: JobTracker, request_id: str) -> None:
    job = jobs.create(request_id, "smol", job_id=request_id)
    task = job.tasks[0]
    for state in (State.QUEUED, State.SCHEDULED, State.RUNNING, State.FINISHED):
        jobs.move(job, task, state, te_id="te-0" if state == State.SCHEDULED else None)


def test_finished_jobs_are_bounded_but_never_dropped_before_their_change_is_taken() -> None:
    jobs = JobTracker(clock=itertools.count().__next__, max_finished=2)
    for i in range(5):
        _finish(jobs, f"r{i}")
    # Nothing taken yet: every record is still held, so the job store will see every end.
    assert len(jobs.jobs) == 5
    assert {j.job_id for j in jobs.take_changed()} == {f"r{i}" for i in range(5)}
    _finish(jobs, "r5")  # now the taken ones beyond the bound go
    assert sorted(jobs.jobs) == ["r4", "r5"]
