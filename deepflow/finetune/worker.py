"""Runs one fine-tuning job's three internal jobs in order: `python -m deepflow.finetune.worker --job-id ID`.

Every stage starts by marking itself running (attempts + 1) and ends by recording its outcome, so a worker
killed anywhere is restarted (by its manager) into the right stage: preprocess is redone (it is cheap and
deterministic), training resumes from its newest checkpoint, evaluation is redone. A cancel is read from
the job record at most once a second and stops training at the next micro-step, with a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deepflow.engine.tokenizer import Tokenizer
from deepflow.files import FilePurpose, FileStore
from deepflow.finetune.jobs import FineTuneJob, FineTuneStore, FTStatus, Stage, StageState
from deepflow.finetune.preprocess import pack, preprocess_lines

__all__ = ["BASE_LEARNING_RATE", "MAX_SEQ_LEN", "run_job"]

logger = logging.getLogger("deepflow.finetune")

BASE_LEARNING_RATE = 2e-4  # what learning_rate_multiplier scales (LoRA on a small model)
MAX_SEQ_LEN = 1024


class _Failed(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


def _stage(store: FineTuneStore, job_id: str, stage: Stage, state: StageState, error: str | None = None):
    now = store.now()

    def change(job: FineTuneJob) -> None:
        rec = job.stages[stage]
        rec.state = state
        if state is StageState.RUNNING:
            rec.attempts += 1
            rec.started_at = now
            rec.finished_at = None
        else:
            rec.finished_at = now
        rec.error = error

    return store.update(job_id, change)


def _finish(store: FineTuneStore, job_id: str, status: FTStatus, **fields) -> FineTuneJob:
    now = store.now()

    def change(job: FineTuneJob) -> None:
        job.status = status
        job.finished_at = now
        for k, v in fields.items():
            setattr(job, k, v)

    return store.update(job_id, change)


def _rows(files: FileStore, job: FineTuneJob, file_id: str, param: str, tok: Tokenizer):
    try:
        data = files.content(file_id, job.tenant)
    except KeyError:
        raise _Failed("invalid_file", f"no file {file_id!r}", param) from None
    result = preprocess_lines(data.split(b"\n"), tok, max_seq_len=MAX_SEQ_LEN)
    if not result.ok:
        raise _Failed(f"invalid_{param}", result.report(), param)
    return result.examples


def run_job(
    job_id: str,
    store: FineTuneStore,
    files: FileStore,
    work_dir: Path,
    *,
    poll_cancel_s: float = 1.0,
    monotonic: Callable[[], float] = time.monotonic,
) -> FTStatus:
    """Run (or go on with) the job; returns its status when this worker stops."""
    from deepflow.finetune.export import save_merged
    from deepflow.finetune.trainer import RunState, TrainConfig, Trainer, evaluate, load_trainable

    job = store.get(job_id)
    if job.status.terminal:
        return job.status
    if job.cancel_requested:
        return _finish(store, job_id, FTStatus.CANCELLED).status
    out = work_dir / job.id
    try:
        # ---- preprocess ------------------------------------------------------------------------------
        _stage(store, job_id, Stage.PREPROCESS, StageState.RUNNING)
        tok = Tokenizer(job.base_model_path)
        train_ex = _rows(files, job, job.training_file, "training_file", tok)
        valid_ex = (
            _rows(files, job, job.validation_file, "validation_file", tok) if job.validation_file else []
        )
        train_rows = pack(train_ex, MAX_SEQ_LEN)
        valid_rows = pack(valid_ex, MAX_SEQ_LEN) if valid_ex else train_rows
        _stage(store, job_id, Stage.PREPROCESS, StageState.SUCCEEDED)
        store.event(job_id, "info", f"Files validated: {len(train_ex)} training examples, packed into "
                    f"{len(train_rows)} rows")  # fmt: skip

        # ---- train -----------------------------------------------------------------------------------
        epochs, batch, lr_mult = job.hyperparameters.resolved(len(train_ex))
        store.update(job_id, lambda j: setattr(j, "status", FTStatus.RUNNING))
        _stage(store, job_id, Stage.TRAIN, StageState.RUNNING)
        config = TrainConfig(n_epochs=epochs, batch_size=batch, learning_rate=BASE_LEARNING_RATE * lr_mult,
                             seed=job.seed, checkpoint_every=20)  # fmt: skip
        last_poll = [monotonic(), False]

        def should_stop() -> bool:
            if monotonic() - last_poll[0] >= poll_cancel_s:
                last_poll[0] = monotonic()
                last_poll[1] = store.get(job_id).cancel_requested
            return bool(last_poll[1])

        trained = [0]

        def on_event(e) -> None:
            trained[0] += e.tokens
            store.event(job_id, "info", f"Step {e.step}/{e.total_steps}: training loss={e.loss:.4f}",
                        {"step": e.step, "train_loss": e.loss, "learning_rate": e.learning_rate,
                         "tokens_per_s": e.tokens_per_s})  # fmt: skip

        trainer = Trainer(job.base_model_path, train_rows, config, out / "train", on_event=on_event,
                          should_stop=should_stop)  # fmt: skip
        state = trainer.run()
        for ckpt in trainer.checkpoints():
            step = int(ckpt.name.split("-")[1])
            loss = (
                trainer.progress.history[step - 1] if step <= len(trainer.progress.history) else float("nan")
            )
            store.checkpoint(job_id, step, str(ckpt), {"step": step, "train_loss": loss})
        if state is RunState.STOPPED:
            _stage(store, job_id, Stage.TRAIN, StageState.CANCELLED)
            store.event(job_id, "info", "The job was cancelled")
            return _finish(store, job_id, FTStatus.CANCELLED).status
        _stage(store, job_id, Stage.TRAIN, StageState.SUCCEEDED)

        # ---- evaluate --------------------------------------------------------------------------------
        _stage(store, job_id, Stage.EVALUATE, StageState.RUNNING)
        before = evaluate(load_trainable(job.base_model_path), valid_rows)
        after = evaluate(trainer.model, valid_rows)
        store.event(job_id, "info", f"Validation loss {before.loss:.4f} → {after.loss:.4f} (perplexity "
                    f"{before.perplexity:.2f} → {after.perplexity:.2f})",
                    {"valid_loss_before": before.loss, "valid_loss": after.loss,
                     "valid_perplexity_before": before.perplexity,
                     "valid_perplexity": after.perplexity})  # fmt: skip
        name = job.output_name()
        model_dir = save_merged(
            trainer.model, job.base_model_path, work_dir / "models" / name.replace(":", "_")
        )
        lines = ["step,train_loss"] + [f"{i + 1},{loss}" for i, loss in enumerate(trainer.progress.history)]
        results = files.create("\n".join(lines).encode() + b"\n", "step_metrics.csv",
                               FilePurpose.FINE_TUNE_RESULTS, tenant=job.tenant)  # fmt: skip
        _stage(store, job_id, Stage.EVALUATE, StageState.SUCCEEDED)
        store.event(job_id, "info", f"New fine-tuned model created: {name}")
        return _finish(store, job_id, FTStatus.SUCCEEDED, fine_tuned_model=name,
                       fine_tuned_model_path=str(model_dir), trained_tokens=trained[0],
                       result_files=[results.id]).status  # fmt: skip
    except _Failed as failure:
        store.event(job_id, "error", str(failure))
        for stage, rec in store.get(job_id).stages.items():
            if rec.state is StageState.RUNNING:
                _stage(store, job_id, stage, StageState.FAILED, str(failure))
        return _finish(store, job_id, FTStatus.FAILED, error=failure.error).status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepflow.finetune.worker")
    p.add_argument("--job-id", required=True)
    p.add_argument("--home", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s FT %(message)s")
    home = Path(a.home)
    store = FineTuneStore(home / "fine_tuning.sqlite")
    files = FileStore(home)
    try:
        status = run_job(a.job_id, store, files, home / "fine_tuning")
    finally:
        store.close()
        files.close()
    logger.info("job %s: %s", a.job_id, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
