"""The fine-tuning *preprocess* job: chat JSONL → validated, templated, tokenized, masked, packed examples.

Every line is checked and a bad one is reported with its line number and the reason (all of them, not just
the first: a user fixes a file once). A good line is rendered with the model's own chat template; only the
assistant turns are learned (their content and the template's end-of-turn after it, so the model learns to
stop), everything else is context. Examples are then packed first-fit-decreasing into rows of at most
`max_seq_len` tokens; each row keeps its examples' boundaries (`segment_ids`, positions restarting at 0),
so the trainer attends within an example only — packing saves padding without leaking one example into
another.

Assistant spans come from the text, not from template tags: the conversation up to an assistant turn is
rendered with the generation prompt, then with that turn; the difference is the turn. A template that is
not prefix-stable this way (it rewrites earlier turns when later ones are added) is refused with a clear
error rather than masked wrongly. Token positions come from the tokenizer's character offsets, so a BPE
merge across a boundary cannot shift the mask.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from deepflow.engine.tokenizer import Tokenizer

__all__ = [
    "IGNORE",
    "LineError",
    "PackedRow",
    "PreprocessResult",
    "TokenizedExample",
    "pack",
    "preprocess_lines",
    "tokenize_chat",
]

IGNORE = -100  # the label of a position that is not learned
ROLES = frozenset({"system", "user", "assistant", "tool"})


class LineError(msgspec.Struct, frozen=True):
    line: int  # 1-based, as an editor shows it
    reason: str


class TokenizedExample(msgspec.Struct, frozen=True):
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE where not learned, else the token itself (shifted by the trainer)

    @property
    def num_learned(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class PackedRow(msgspec.Struct, frozen=True):
    input_ids: list[int]
    labels: list[int]
    segment_ids: list[int]  # which example of the row each position belongs to (0, 1, ...)
    position_ids: list[int]  # restart at 0 for every example
    lines: list[int]  # the source lines packed here


@dataclass
class PreprocessResult:
    examples: list[TokenizedExample] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    num_lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.examples)

    def report(self, limit: int = 20) -> str:
        if self.ok:
            return f"{len(self.examples)} examples"
        if not self.errors:
            return "the file has no examples"
        shown = "; ".join(f"line {e.line}: {e.reason}" for e in self.errors[:limit])
        more = len(self.errors) - limit
        return f"{len(self.errors)} invalid lines: {shown}" + (f" (and {more} more)" if more > 0 else "")


def _check_messages(obj: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    if not isinstance(obj, dict):
        return None, "a line must be a JSON object"
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "'messages' must be a non-empty list"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return None, f"messages[{i}] must be an object"
        role = m.get("role")
        if role not in ROLES:
            return None, f"messages[{i}].role must be one of {sorted(ROLES)}, not {role!r}"
        content = m.get("content")
        if not isinstance(content, str):
            return None, f"messages[{i}].content must be a string"
        if role == "assistant" and not content.strip():
            return None, f"messages[{i}] is an empty assistant turn"
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            return None, f"messages[{i}].weight must be 0 or 1"
        out.append({"role": role, "content": content, "weight": weight})
    if not any(m["role"] == "assistant" and m["weight"] for m in out):
        return None, "no assistant turn to learn from"
    return out, None


def tokenize_chat(tok: Tokenizer, messages: Sequence[dict[str, Any]], line: int = 0) -> TokenizedExample:
    """Render and tokenize one conversation; only weighted assistant turns are labelled. Raises ValueError
    when the template is not prefix-stable for this conversation."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = tok.apply_chat_template(plain, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        before = tok.apply_chat_template(plain[:i], add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(plain[: i + 1], add_generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise ValueError(
                "the chat template is not prefix-stable: earlier turns change as turns are added"
            )
        spans.append((len(before), len(through)))
    enc = tok.backend.encode(full, add_special_tokens=False)
    labels = []
    k = 0
    for token, (start, _end) in zip(enc.ids, enc.offsets, strict=True):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        inside = k < len(spans) and spans[k][0] <= start < spans[k][1]
        labels.append(token if inside else IGNORE)
    return TokenizedExample(line=line, input_ids=list(enc.ids), labels=labels)


def preprocess_lines(lines: Iterable[str | bytes], tok: Tokenizer, *, max_seq_len: int) -> PreprocessResult:
    """Validate and tokenize every line of a chat JSONL file."""
    result = PreprocessResult()
    for n, raw in enumerate(lines, start=1):
        result.num_lines = n
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue  # blank lines (a trailing newline) are not examples
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            result.errors.append(LineError(n, f"not valid JSON ({exc})"))
            continue
        messages, reason = _check_messages(obj)
        if messages is None:
            result.errors.append(LineError(n, reason or "invalid"))
            continue
        try:
            example = tokenize_chat(tok, messages, line=n)
        except Exception as exc:
            result.errors.append(LineError(n, f"cannot apply the chat template: {exc}"))
            continue
        if len(example.input_ids) > max_seq_len:
            result.errors.append(
                LineError(n, f"{len(example.input_ids)} tokens, more than max_seq_len {max_seq_len}")
            )
            continue
        if example.num_learned == 0:
            result.errors.append(LineError(n, "no assistant token left to learn after tokenization"))
            continue
        result.examples.append(example)
    return result


def pack(examples: Sequence[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """First-fit decreasing into rows of ≤ `max_seq_len` tokens; deterministic (ties by source line)."""
    order = sorted(examples, key=lambda e: (-len(e.input_ids), e.line))
    bins: list[list[TokenizedExample]] = []
    room: list[int] = []
    for ex in order:
        n = len(ex.input_ids)
        if n > max_seq_len:
            raise ValueError(f"line {ex.line}: {n} tokens exceed max_seq_len {max_seq_len}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(ex)
                room[b] -= n
                break
        else:
            bins.append([ex])
            room.append(max_seq_len - n)
    rows = []
    for members in bins:
        members.sort(key=lambda e: e.line)
        ids: list[int] = []
        labels: list[int] = []
        segs: list[int] = []
        pos: list[int] = []
        for s, ex in enumerate(members):
            ids += ex.input_ids
            labels += ex.labels
            segs += [s] * len(ex.input_ids)
            pos += list(range(len(ex.input_ids)))
        rows.append(PackedRow(ids, labels, segs, pos, [e.line for e in members]))
    rows.sort(key=lambda r: r.lines[0])
    return rows
