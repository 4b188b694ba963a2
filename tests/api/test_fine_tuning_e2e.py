"""The files and fine-tuning APIs through the official openai client against a real `deepflow serve`:
upload, a job that runs its three internal jobs to the end, events, checkpoints, cancel, bad input."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.api.server_utils import API_KEY, ServerProcess, smollm2_args, start_server, stop_cleanly

ANSWER = "Always blue."


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFLOW_HOME", str(home))
        srv = start_server([*smollm2_args(smollm2_dir), "--standalone"])
    yield srv
    stop_cleanly(srv)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def jsonl(n: int) -> bytes:
    turn = [{"role": "assistant", "content": ANSWER}]
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, *turn]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode()


def wait_status(client: OpenAI, job_id: str, statuses: set[str], timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def test_files_round_trip_and_bad_uploads(client: OpenAI):
    f = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(3))), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes == len(jsonl(3))
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read() == jsonl(3)
    assert f.id in [x.id for x in client.files.list()]
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("bad.jsonl", io.BytesIO(b'{"ok": 1}\nnot json\n')), purpose="fine-tune")
    assert "line 2" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="batch_output")
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_a_job_runs_to_a_fine_tuned_model(client: OpenAI, server: ServerProcess):
    f = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(8))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=server.model, training_file=f.id, suffix="blue", seed=1,
        hyperparameters={"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 10},
    )  # fmt: skip
    assert job.status in ("queued", "running") and job.object == "fine_tuning.job"
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"{server.model}:ft-blue-")
    assert done.trained_tokens and done.result_files
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.message.startswith("Step 3/3") for e in events)
    assert any("Validation loss" in e.message for e in events)
    (ckpt,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.step_number == 3
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    # The three internal jobs of the request, beside OpenAI's fields.
    raw = client.get(f"/fine_tuning/jobs/{job.id}", cast_to=object)
    assert [j["state"] for j in raw["deepflow"]["jobs"]] == ["succeeded"] * 3
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)  # already over


def test_bad_requests_and_cancel(client: OpenAI, server: ServerProcess):
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-model", training_file="file-x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model=server.model, training_file="file-nope")
    assert bad.value.body["param"] == "training_file"
    f = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(4))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(
            model=server.model, training_file=f.id, hyperparameters={"n_epochs": 0}
        )
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    job = client.fine_tuning.jobs.create(model=server.model, training_file=f.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})  # fmt: skip
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_status(client, job.id, {"cancelled", "succeeded", "failed"}, timeout=300)
    assert done.status == "cancelled"
