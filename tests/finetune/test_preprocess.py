"""The preprocess job: line-numbered errors, assistant-only labels, packing that keeps examples apart."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepflow.engine.tokenizer import Tokenizer
from deepflow.finetune.preprocess import IGNORE, TokenizedExample, pack, preprocess_lines, tokenize_chat


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return Tokenizer(smollm2_dir)


def learned_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=False)


def chat(*turns):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(turns)]}


def test_only_assistant_turns_are_learned(tok):
    ex = tokenize_chat(tok, chat("What is 2+2?", "Four.", "And 3+3?", "Six.")["messages"])
    text = learned_text(tok, ex)
    assert "Four.<|im_end|>" in text and "Six.<|im_end|>" in text
    assert "2+2" not in text and "user" not in text and "system" not in text
    # The input is the template's rendering, token for token.
    full = tok.apply_chat_template(chat("What is 2+2?", "Four.", "And 3+3?", "Six.")["messages"], False)
    assert ex.input_ids == tok.encode(full, add_special_tokens=False)


def test_weight_zero_turns_are_context(tok):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Old answer.", "weight": 0},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "New answer."},
    ]
    result = preprocess_lines([json.dumps({"messages": messages})], tok, max_seq_len=512)
    text = learned_text(tok, result.examples[0])
    assert "New answer." in text and "Old answer." not in text


def test_every_bad_line_is_reported_with_its_number(tok):
    lines = [
        json.dumps(chat("q", "a")),
        "{not json",
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}]}),
        "",
        json.dumps(chat("q", "a " * 400)),
        "[1, 2]",
        json.dumps(chat("q", "   ")),
    ]
    result = preprocess_lines(lines, tok, max_seq_len=256)
    assert not result.ok and len(result.examples) == 1
    by_line = {e.line: e.reason for e in result.errors}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 8, 9, 10]
    assert "JSON" in by_line[2] and "non-empty" in by_line[3] and "robot" in by_line[4]
    assert "no assistant" in by_line[5] and "string" in by_line[6] and "max_seq_len" in by_line[8]
    assert "object" in by_line[9] and "empty assistant" in by_line[10]
    assert "line 2:" in result.report()


def test_packing_fills_rows_and_keeps_examples_apart(tok):
    exs = [
        tokenize_chat(tok, chat(f"question {i}", "answer " * (i % 5 + 1))["messages"], line=i + 1)
        for i in range(12)
    ]
    rows = pack(exs, max_seq_len=160)
    assert sorted(line for r in rows for line in r.lines) == list(range(1, 13))
    for r in rows:
        assert len(r.input_ids) <= 160
        assert len(r.input_ids) == len(r.labels) == len(r.segment_ids) == len(r.position_ids)
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert starts == [r.segment_ids.index(s) for s in range(len(r.lines))]
    assert len(rows) < len(exs)  # packing saved rows


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=40), st.integers(100, 300))
def test_pack_is_a_partition_within_bounds(lengths, max_len):
    exs = [TokenizedExample(line=i + 1, input_ids=[7] * n, labels=[7] * n) for i, n in enumerate(lengths)]
    rows = pack(exs, max_len)
    assert sorted(line for r in rows for line in r.lines) == list(range(1, len(lengths) + 1))
    assert all(len(r.input_ids) <= max_len for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(lengths)
    # First-fit decreasing: no two rows could be merged into one.
    sizes = sorted(len(r.input_ids) for r in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > max_len
