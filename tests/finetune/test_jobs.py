"""Fine-tuning jobs: the store (OpenAI shapes, three internal jobs, tenants) and the worker end to end."""

from __future__ import annotations

import json
import threading

import pytest

from deepflow.files import FilePurpose, FileStore
from deepflow.finetune.jobs import FineTuneStore, FTStatus, Hyperparameters, NoSuchJob, Stage, StageState


@pytest.fixture
def stores(tmp_path):
    jobs, files = FineTuneStore(tmp_path / "ft.sqlite"), FileStore(tmp_path)
    yield jobs, files
    jobs.close()
    files.close()


def test_store_shapes_events_and_tenants(stores):
    jobs, _ = stores
    job = jobs.create(model="m", base_model_path="/x", training_file="file-1", tenant="t1", suffix="demo")
    got = jobs.get(job.id, tenant="t1")
    assert got.status is FTStatus.VALIDATING_FILES and set(got.stages) == set(Stage)
    with pytest.raises(NoSuchJob):
        jobs.get(job.id, tenant="t2")
    openai = got.to_openai()
    assert openai["object"] == "fine_tuning.job" and openai["status"] == "validating_files"
    assert openai["hyperparameters"] == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }
    platform = got.to_platform()
    assert [j["stage"] for j in platform["jobs"]] == ["preprocess", "train", "evaluate"]
    jobs.event(job.id, "info", "Step 1/2: training loss=1.0", {"step": 1, "train_loss": 1.0})
    events = jobs.events(job.id)
    assert events[0]["type"] == "metrics" and events[1]["message"].startswith("Created")
    assert jobs.events(job.id, after=events[0]["id"])[0]["id"] == events[1]["id"]
    assert [j.id for j in jobs.list("t1")] == [job.id] and jobs.list("t2") == []
    assert got.output_name().startswith("m:ft-demo-")
    assert Hyperparameters().resolved(10) == (6, 4, 1.0)
    assert Hyperparameters(n_epochs=2, batch_size=8, learning_rate_multiplier=0.5).resolved(10) == (2, 8, 0.5)


def _chat_file(files, answer: str, n: int, tenant: str = "") -> str:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"Question number {i}?"},
                                 {"role": "assistant", "content": answer}]})
        for i in range(n)
    ]  # fmt: skip
    return files.create("\n".join(lines).encode(), "train.jsonl", FilePurpose.FINE_TUNE, tenant).id


def test_a_bad_training_file_fails_the_preprocess_job_with_line_numbers(stores, smollm2_dir, tmp_path):
    from deepflow.finetune.worker import run_job

    jobs, files = stores
    bad = files.create(b'{"messages": []}\nnot json\n', "bad.jsonl", FilePurpose.FINE_TUNE).id
    job = jobs.create(model="m", base_model_path=str(smollm2_dir), training_file=bad)
    assert run_job(job.id, jobs, files, tmp_path / "work") is FTStatus.FAILED
    done = jobs.get(job.id)
    assert done.error["code"] == "invalid_training_file" and "line 1" in done.error["message"]
    assert "line 2" in done.error["message"]
    assert done.stages[Stage.PREPROCESS].state is StageState.FAILED
    assert done.stages[Stage.TRAIN].state is StageState.PENDING


def test_cancel_stops_training_at_the_next_step(stores, smollm2_dir, tmp_path):
    from deepflow.finetune.worker import run_job

    jobs, files = stores
    train = _chat_file(files, "No.", 16)
    job = jobs.create(model="m", base_model_path=str(smollm2_dir), training_file=train,
                      hyperparameters=Hyperparameters(n_epochs=20, batch_size=2))  # fmt: skip
    result = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("s", run_job(job.id, jobs, files, tmp_path / "w", poll_cancel_s=0.0))
    )
    worker.start()
    # Cancel once training has produced its first step (an event, not a sleep).
    for _ in range(6000):
        if any(e["type"] == "metrics" for e in jobs.events(job.id, limit=5)):
            break
        worker.join(timeout=0.05)
    jobs.update(job.id, lambda j: setattr(j, "cancel_requested", True))
    worker.join(timeout=300)
    assert not worker.is_alive() and result["s"] is FTStatus.CANCELLED
    done = jobs.get(job.id)
    assert done.stages[Stage.TRAIN].state is StageState.CANCELLED
    steps = [e for e in jobs.events(job.id, limit=1000) if e["type"] == "metrics"]
    assert len(steps) < 20  # 20 epochs of one packed row: it stopped long before the end
