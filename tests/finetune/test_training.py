"""LoRA training on the engine's own model code: exact at init, matches HF's forward, learns, resumes
bit-identically, merges and exports."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from deepflow.engine.models.llama import load_model
from deepflow.finetune.export import save_merged
from deepflow.finetune.lora import adapter_state, apply_lora
from deepflow.finetune.preprocess import IGNORE, PackedRow, TokenizedExample, pack
from deepflow.finetune.trainer import (
    RunState,
    TrainConfig,
    Trainer,
    evaluate,
    forward_logits_at,
    training_backend,
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """One architecture for the longer runs (q/k/v bias and GQA: the fused slices that can go wrong)."""
    from tests.conftest import make_tiny_model

    return make_tiny_model("qwen2-bias-gqa3", tmp_path_factory.mktemp("qwen"))


def row_of(ids: list[int], learn_from: int = 0) -> PackedRow:
    labels = [IGNORE] * learn_from + ids[learn_from:]
    return PackedRow(ids, labels, [0] * len(ids), list(range(len(ids))), [1])


def all_positions(ids: list[int]) -> PackedRow:
    return row_of(ids, learn_from=1)


def test_training_forward_matches_hf_and_packing_keeps_examples_apart(tiny_model_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    model = load_model(tiny_model_dir, dtype=torch.float32, backend="torch")
    backend = training_backend(model)
    a = [5, 17, 300, 42, 8, 99, 120]
    b = [7, 7, 250, 3, 64]
    with torch.no_grad():
        ours, targets, _ = forward_logits_at(model, backend, [all_positions(a)])
        ref = hf(torch.tensor([a])).logits[0, :-1]
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        assert targets.tolist() == a[1:]
        # Two examples packed into one row give each one's logits as if alone.
        exs = [TokenizedExample(1, a, [IGNORE, *a[1:]]), TokenizedExample(2, b, [IGNORE, *b[1:]])]
        (packed,) = pack(exs, 64)
        both, _, _ = forward_logits_at(model, backend, [packed])
        alone_b, _, _ = forward_logits_at(model, backend, [all_positions(b)])
        first = packed.lines[0]
        n_a = len(a) - 1
        if first == 1:
            torch.testing.assert_close(both[:n_a], ours)
            torch.testing.assert_close(both[n_a:], alone_b)
        else:
            torch.testing.assert_close(both[: len(b) - 1], alone_b)
            torch.testing.assert_close(both[len(b) - 1 :], ours)


def test_lora_starts_as_the_base_model_and_names_adapters_like_peft(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32, backend="torch")
    backend = training_backend(model)
    row = all_positions([5, 17, 300, 42, 8])
    with torch.no_grad():
        before, _, _ = forward_logits_at(model, backend, [row])
    params = apply_lora(model, rank=4, alpha=8, seed=1)
    with torch.no_grad():
        after, _, _ = forward_logits_at(model, backend, [row])
    assert torch.equal(before, after)
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in model.parameters()) == len(params)
    names = adapter_state(model)
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" in names
    assert len(names) == len(params)


def phrase_rows(n: int) -> list[PackedRow]:
    """A synthetic task: whatever the prompt, answer with the fixed phrase 11 12 13 14."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        prompt = torch.randint(20, 500, (6,), generator=g).tolist()
        rows.append(row_of([*prompt, 11, 12, 13, 14], learn_from=len(prompt)))
    return rows


def test_loss_falls_and_a_resumed_run_ends_with_the_same_weights(qwen_dir, tmp_path):
    tiny_model_dir = qwen_dir
    rows = phrase_rows(12)
    cfg = TrainConfig(n_epochs=8, batch_size=3, grad_accum=2, learning_rate=1e-2, checkpoint_every=3,
                      lora_rank=4, seed=7)  # fmt: skip
    events = []
    full = Trainer(tiny_model_dir, rows, cfg, tmp_path / "full", on_event=events.append)
    before = evaluate(full.model, rows)
    assert full.run() is RunState.SUCCEEDED
    after = evaluate(full.model, rows)
    assert after.loss < before.loss * 0.5
    assert [e.step for e in events] == list(range(1, full.total_steps + 1))
    assert events[-1].learning_rate < events[0].learning_rate  # cosine decay

    # The same run, stopped after 4 optimizer steps (a cancel or a pause), then resumed by a new trainer.
    calls = {"n": 0}

    def stop_after_4() -> bool:
        calls["n"] += 1
        return calls["n"] >= 4

    first = Trainer(tiny_model_dir, rows, cfg, tmp_path / "resumed", should_stop=stop_after_4)
    assert first.run() is RunState.STOPPED
    assert first.progress.step == 4
    second = Trainer(tiny_model_dir, rows, cfg, tmp_path / "resumed")
    assert second.run() is RunState.SUCCEEDED
    a, b = adapter_state(full.model), adapter_state(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(second.checkpoints()) == cfg.keep_checkpoints
    saved = load_file(str(second.checkpoints()[-1] / "adapter.safetensors"))
    assert all(torch.equal(saved[k], b[k]) for k in b)


def test_merged_export_loads_as_a_plain_model_with_the_same_outputs(qwen_dir, tmp_path):
    tiny_model_dir = qwen_dir
    rows = phrase_rows(6)
    cfg = TrainConfig(n_epochs=2, batch_size=3, learning_rate=5e-3, lora_rank=4)
    t = Trainer(tiny_model_dir, rows, cfg, tmp_path / "run")
    t.run()
    backend = training_backend(t.model)
    with torch.no_grad():
        tuned, _, _ = forward_logits_at(t.model, backend, rows[:2])
    out = save_merged(t.model, tiny_model_dir, tmp_path / "merged")
    merged = load_model(out, dtype=torch.float32, backend="torch")
    with torch.no_grad():
        again, _, _ = forward_logits_at(merged, training_backend(merged), rows[:2])
    torch.testing.assert_close(again, tuned, rtol=1e-4, atol=1e-4)


def test_config_is_validated():
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        TrainConfig(learning_rate=0)
