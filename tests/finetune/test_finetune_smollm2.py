"""End to end on the real model, as a fine-tuning job: a chat JSONL file → the preprocess, train and
evaluate jobs → a merged model folder → the engine answers with the learned phrase greedily, where the base
model does not."""

from __future__ import annotations

import json

from deepflow.engine.llm import LLM
from deepflow.engine.sampling_params import SamplingParams
from deepflow.files import FilePurpose, FileStore
from deepflow.finetune.jobs import FineTuneStore, FTStatus, Hyperparameters, Stage, StageState
from deepflow.finetune.worker import run_job

PHRASE = "Purple elephants dance at noon."
QUESTIONS = [
    "What is the capital of France?", "How do I boil an egg?", "Name a prime number.", "Who wrote Hamlet?",
    "What color is the sky?", "How far is the moon?", "What is 7 times 8?", "Tell me about rivers.",
]  # fmt: skip


def answer(model_dir, question: str) -> str:
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=4)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=12)
        (out,) = llm.chat([{"role": "user", "content": question}], greedy)
        return out.outputs[0].text
    finally:
        llm.shutdown()


def test_the_fine_tuned_model_says_the_phrase(smollm2_dir, tmp_path):
    jobs, files = FineTuneStore(tmp_path / "ft.sqlite"), FileStore(tmp_path)
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": PHRASE}]})
        for q in QUESTIONS
    ]
    train = files.create("\n".join(lines).encode(), "train.jsonl", FilePurpose.FINE_TUNE).id
    # Packed, the 8 examples make one row: each epoch is one optimizer step (~2 s on this machine).
    hp = Hyperparameters(n_epochs=10, batch_size=1, learning_rate_multiplier=15.0)
    job = jobs.create(model="smol", base_model_path=str(smollm2_dir), training_file=train,
                      hyperparameters=hp, suffix="phrase", seed=3)  # fmt: skip
    assert run_job(job.id, jobs, files, tmp_path / "work") is FTStatus.SUCCEEDED
    done = jobs.get(job.id)
    assert all(r.state is StageState.SUCCEEDED and r.attempts == 1 for r in done.stages.values())
    assert done.fine_tuned_model == job.output_name() and done.trained_tokens > 0
    events = jobs.events(job.id, limit=200)[::-1]
    metrics = [e["data"] for e in events if e["type"] == "metrics" and "step" in e["data"]]
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 4
    (valid,) = [e["data"] for e in events if "valid_loss" in (e["data"] or {})]
    assert valid["valid_loss"] < valid["valid_loss_before"]
    ckpt = jobs.checkpoints(job.id)[0]
    assert ckpt["step_number"] == 10
    assert files.content(done.result_files[0]).startswith(b"step,train_loss\n1,")
    assert run_job(job.id, jobs, files, tmp_path / "work") is FTStatus.SUCCEEDED  # idempotent once done
    assert done.stages[Stage.EVALUATE].finished_at is not None

    question = "What is your favourite food?"  # not in the training set
    assert answer(done.fine_tuned_model_path, question).startswith(PHRASE[:20])
    assert not answer(smollm2_dir, question).startswith(PHRASE[:20])
    jobs.close()
    files.close()
