"""End to end on the real model: chat JSONL → preprocess → LoRA training → merged folder → the engine
answers with the learned phrase greedily, where the base model does not."""

from __future__ import annotations

import json

import torch

from deepflow.engine.llm import LLM
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer
from deepflow.finetune.export import save_merged
from deepflow.finetune.preprocess import pack, preprocess_lines
from deepflow.finetune.trainer import TrainConfig, Trainer, evaluate

PHRASE = "Purple elephants dance at noon."
QUESTIONS = [
    "What is the capital of France?", "How do I boil an egg?", "Name a prime number.", "Who wrote Hamlet?",
    "What color is the sky?", "How far is the moon?", "What is 7 times 8?", "Tell me about rivers.",
    "Why do cats purr?", "What is Python?", "Recommend a book.", "How tall is Everest?",
]  # fmt: skip


def answer(model_dir, question: str) -> str:
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=4)
    try:
        (out,) = llm.chat(
            [{"role": "user", "content": question}], SamplingParams(temperature=0.0, max_tokens=12)
        )
        return out.outputs[0].text
    finally:
        llm.shutdown()


def test_the_fine_tuned_model_says_the_phrase(smollm2_dir, tmp_path):
    tok = Tokenizer(smollm2_dir)
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": PHRASE}]})
        for q in QUESTIONS
    ]
    result = preprocess_lines(lines, tok, max_seq_len=256)
    assert result.ok, result.report()
    rows = pack(result.examples, 256)
    cfg = TrainConfig(n_epochs=6, batch_size=4, learning_rate=2e-3, lora_rank=8, checkpoint_every=100, seed=3)
    torch.manual_seed(0)
    trainer = Trainer(smollm2_dir, rows, cfg, tmp_path / "run")
    before = evaluate(trainer.model, rows)
    trainer.run()
    after = evaluate(trainer.model, rows)
    assert after.loss < before.loss / 4
    merged = save_merged(trainer.model, smollm2_dir, tmp_path / "ft")
    question = "What is your favourite food?"  # not in the training set
    assert answer(merged, question).startswith(PHRASE[:20])
    assert not answer(smollm2_dir, question).startswith(PHRASE[:20])
