"""The fine-tuning *train* job: LoRA on packed rows, AdamW, gradient accumulation, a cosine schedule,
checkpoints that a killed task resumes from with the same final weights, and evaluation.

Determinism: the data order of epoch e is a permutation drawn from `seed + e`; the adapters' init from
`seed`; there is no dropout. A checkpoint holds the adapters, AdamW's state and the optimizer step, so a
run resumed from step k repeats exactly what the uninterrupted run did after step k (same thread count).
Checkpoints are written to a temporary folder and renamed (a crash mid-write leaves the previous one), and
the last `keep_checkpoints` are kept.

`should_stop` is polled between micro-steps: a cancel or a pause for serving (the CM taking the capacity
back) ends the run at the next micro-step with a checkpoint, never mid-update.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from deepflow.engine.models.llama import LlamaModel, load_model
from deepflow.finetune.attention import TrainingAttention, TrainingMetadata
from deepflow.finetune.lora import adapter_state, apply_lora, load_adapter_state
from deepflow.finetune.preprocess import IGNORE, PackedRow

__all__ = ["EvalResult", "RunState", "TrainConfig", "TrainEvent", "Trainer", "evaluate", "row_loss"]


@dataclass(frozen=True)
class TrainConfig:
    n_epochs: int = 3
    batch_size: int = 4  # packed rows per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    learning_rate: float = 2e-4  # OpenAI's learning_rate_multiplier scales this
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    checkpoint_every: int = 50  # optimizer steps
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.n_epochs, self.batch_size, self.grad_accum, self.lora_rank, self.checkpoint_every) < 1:
            raise ValueError("n_epochs, batch_size, grad_accum, lora_rank and checkpoint_every must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")


class RunState(StrEnum):
    SUCCEEDED = "succeeded"
    STOPPED = "stopped"  # cancelled or paused: a checkpoint holds where it stopped


@dataclass(frozen=True)
class TrainEvent:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int
    loss: float  # mean over the step's learned tokens
    learning_rate: float
    tokens: int  # tokens processed in the step
    tokens_per_s: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int


@dataclass
class _Progress:
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-steps done (the data position)
    history: list[float] = field(default_factory=list)


def count_targets(rows: Sequence[PackedRow]) -> int:
    """Positions whose next token is learned (within its example), as `forward_logits_at` selects them."""
    n = 0
    for row in rows:
        seg, labels = row.segment_ids, row.labels
        n += sum(1 for t in range(len(labels) - 1) if labels[t + 1] != IGNORE and seg[t] == seg[t + 1])
    return n


def forward_logits_at(
    model: LlamaModel, backend: TrainingAttention, rows: Sequence[PackedRow]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Logits at the positions whose next token is learned, with those targets; and the token count.

    The rows are laid out flat (the engine's layers work on [tokens, hidden]) with segment ids unique
    across rows, so the mask keeps every example to itself."""
    ids: list[int] = []
    pos: list[int] = []
    segs: list[int] = []
    targets_at: list[int] = []
    targets: list[int] = []
    base_seg = 0
    for row in rows:
        offset = len(ids)
        ids += row.input_ids
        pos += row.position_ids
        segs += [base_seg + s for s in row.segment_ids]
        base_seg += len(row.lines)
        for t in range(len(row.input_ids) - 1):
            label = row.labels[t + 1]
            if label != IGNORE and row.segment_ids[t] == row.segment_ids[t + 1]:
                targets_at.append(offset + t)
                targets.append(label)
    device = model.embed_tokens.weight.device
    meta = TrainingMetadata(
        positions=torch.tensor(pos, device=device), segment_ids=torch.tensor(segs, device=device)
    )
    backend.prepare(meta)
    x = model.embed_tokens(torch.tensor(ids, device=device))
    residual = None
    for layer in model.layers:
        x, residual = layer(x, residual, backend, None, meta)
    index = torch.tensor(targets_at, dtype=torch.long, device=device)
    assert residual is not None
    h, _ = model.norm(x[index], residual[index])
    return model.lm_head(h).float(), torch.tensor(targets, device=device), len(ids)


def row_loss(
    model: LlamaModel, backend: TrainingAttention, rows: Sequence[PackedRow]
) -> tuple[torch.Tensor, int, int]:
    """(summed cross-entropy over learned tokens, learned tokens, all tokens)."""
    logits, targets, n_tokens = forward_logits_at(model, backend, rows)
    if targets.numel() == 0:
        return logits.sum() * 0.0, 0, n_tokens
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel()), n_tokens


def training_backend(model: LlamaModel) -> TrainingAttention:
    a = model.args
    return TrainingAttention(a.num_heads, a.num_kv_heads, a.head_dim, model.rotary.cos, model.rotary.sin)


@torch.no_grad()
def evaluate(model: LlamaModel, rows: Sequence[PackedRow], batch_size: int = 4) -> EvalResult:
    backend = training_backend(model)
    total = 0.0
    n = 0
    for i in range(0, len(rows), batch_size):
        loss, learned, _ = row_loss(model, backend, rows[i : i + batch_size])
        total += float(loss)
        n += learned
    mean = total / max(n, 1)
    return EvalResult(loss=mean, perplexity=math.exp(min(mean, 50.0)), tokens=n)


def load_trainable(model_dir: str | Path) -> LlamaModel:
    """The base model for training: fp32, torch backend, plain nn.Linear layers (no packing)."""
    model = load_model(model_dir, dtype=torch.float32, backend="torch")
    model.train()
    return model


class Trainer:
    def __init__(
        self,
        model_dir: str | Path,
        rows: Sequence[PackedRow],
        config: TrainConfig,
        out_dir: str | Path,
        *,
        on_event: Callable[[TrainEvent], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not rows:
            raise ValueError("no training rows")
        self.config = config
        self.rows = list(rows)
        self.out_dir = Path(out_dir)
        self.on_event = on_event or (lambda e: None)
        self.should_stop = should_stop
        self.clock = clock
        self.model = load_trainable(model_dir)
        self.params = apply_lora(self.model, config.lora_rank, config.lora_alpha, seed=config.seed)
        self.backend = training_backend(self.model)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.micro_per_epoch = math.ceil(len(self.rows) / config.batch_size)
        self.total_micro = self.micro_per_epoch * config.n_epochs
        self.total_steps = math.ceil(self.total_micro / config.grad_accum)
        self.progress = _Progress()

    # ---- schedule and data ----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        span = max(1, self.total_steps - c.warmup_steps)
        return c.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - c.warmup_steps) / span)))

    def _batch(self, micro: int) -> list[PackedRow]:
        epoch, k = divmod(micro, self.micro_per_epoch)
        order = torch.randperm(
            len(self.rows), generator=torch.Generator().manual_seed(self.config.seed + epoch)
        )
        b = self.config.batch_size
        return [self.rows[i] for i in order[k * b : (k + 1) * b].tolist()]

    # ---- checkpoints ----------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.glob("step-*") if (p / "state.pt").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self) -> Path:
        step = self.progress.step
        final = self.checkpoint_dir / f"step-{step:07d}"
        tmp = self.checkpoint_dir / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(adapter_state(self.model), str(tmp / "adapter.safetensors"))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "progress": asdict(self.progress)}, tmp / "state.pt"
        )
        (tmp / "config.json").write_text(json.dumps(asdict(self.config)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.checkpoints()[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self) -> bool:
        """Continue from the newest checkpoint, if any; True when one was loaded."""
        found = self.checkpoints()
        if not found:
            return False
        latest = found[-1]
        load_adapter_state(self.model, load_file(str(latest / "adapter.safetensors")))
        state = torch.load(latest / "state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = _Progress(**state["progress"])
        return True

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> RunState:
        self.resume()
        c = self.config
        p = self.progress
        while p.micro < self.total_micro:
            start = self.clock()
            lr = self.lr_at(p.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            micro_batches = [
                self._batch(m) for m in range(p.micro, min(p.micro + c.grad_accum, self.total_micro))
            ]
            # The step's loss is the mean over all its learned tokens, however they split into micro-steps:
            # count them first (from the labels, no forward), then backward each micro-step at once.
            learned = sum(count_targets(rows) for rows in micro_batches)
            total = 0.0
            tokens = 0
            for rows in micro_batches:
                loss, _, t = row_loss(self.model, self.backend, rows)
                (loss / max(learned, 1)).backward()
                total += float(loss.detach())
                tokens += t
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            p.micro += len(micro_batches)
            p.step += 1
            mean = total / max(learned, 1)
            p.history.append(mean)
            elapsed = max(self.clock() - start, 1e-9)
            self.on_event(
                TrainEvent(
                    step=p.step,
                    total_steps=self.total_steps,
                    epoch=(p.micro - 1) // self.micro_per_epoch,
                    loss=mean,
                    learning_rate=lr,
                    tokens=tokens,
                    tokens_per_s=tokens / elapsed,
                )
            )
            done = p.micro >= self.total_micro
            if done or p.step % c.checkpoint_every == 0:
                self.save_checkpoint()
            if not done and self.should_stop():
                self.save_checkpoint()
                return RunState.STOPPED
        return RunState.SUCCEEDED
