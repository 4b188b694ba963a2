"""Synthetic workloads, deterministic from a seed: random, shared-prefix and multi-turn sessions.

Every dataset is a list of `Session`s: requests a worker sends one after another. Single-shot datasets have
one turn per session; a multi-turn conversation has several, and the history of turn t+1 holds the server's
real answer to turn t, so only the user messages are built here (`chat_messages` assembles the rest).
Prompts are words of a `WordPool` (one token each), so lengths are exact without a server round trip: as
token ids for `/v1/completions`, as text for chat (where the chat template adds its own few tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deepflow.bench.tokens import TextTokenizer, WordPool

__all__ = [
    "Session",
    "Turn",
    "build_dataset",
    "chat_messages",
    "multi_turn_dataset",
    "random_dataset",
    "rng_for",
    "shared_prefix_dataset",
]

Prompt = list[int] | str

# Independent random streams from one --seed (SeedSequence spawn keys): changing one use leaves the others.
STREAM_DATASET, STREAM_ARRIVALS, STREAM_WARMUP = 0, 1, 2


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """The generator of one use (`STREAM_*`) of `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


@dataclass(frozen=True)
class Turn:
    """One request's own input: token ids (completions) or the user message text (chat)."""

    prompt: Prompt
    prompt_len: int  # tokens of `prompt` (text: as the tokenizer counts them, without template tokens)


@dataclass(frozen=True)
class Session:
    """Requests sent in order by one worker; `system` is a chat system prompt shared by all sessions."""

    index: int
    turns: tuple[Turn, ...]
    system: str | None = None
    system_len: int = 0


class _PromptMaker:
    """Draws word sequences of exact token length, as ids or verified text."""

    def __init__(self, pool: WordPool, rng: np.random.Generator, tokenizer: TextTokenizer | None) -> None:
        self.pool, self.rng, self.tokenizer = pool, rng, tokenizer

    def make(self, n: int, as_text: bool) -> Turn:
        indices = self.pool.draw(self.rng, n)
        if not as_text:
            return Turn(self.pool.token_ids(indices), n)
        return self._fit_text(indices, n)

    def _fit_text(self, indices: list[int], n: int) -> Turn:
        """Words are single tokens, so the text is almost always exact at once; else add/drop words."""
        text = self.pool.text(indices)
        if self.tokenizer is None:
            return Turn(text, n)
        count = n
        for _ in range(8):
            count = len(self.tokenizer.encode(text))
            if count == n:
                break
            if count > n:
                indices = indices[: max(1, len(indices) - (count - n))]
            else:
                indices = indices + self.pool.draw(self.rng, n - count)
            text = self.pool.text(indices)
        else:
            count = len(self.tokenizer.encode(text))
        return Turn(text, count)


def random_dataset(
    pool: WordPool,
    num: int,
    input_len: int,
    seed: int,
    as_text: bool = False,
    tokenizer: TextTokenizer | None = None,
    stream: int = STREAM_DATASET,
) -> list[Session]:
    """`num` independent prompts of exactly `input_len` tokens."""
    maker = _PromptMaker(pool, rng_for(seed, stream), tokenizer)
    return [Session(i, (maker.make(input_len, as_text),)) for i in range(num)]


def shared_prefix_dataset(
    pool: WordPool,
    num: int,
    prefix_len: int,
    input_len: int,
    seed: int,
    as_text: bool = False,
    tokenizer: TextTokenizer | None = None,
) -> list[Session]:
    """`num` prompts: one common prefix of `prefix_len` tokens, then a unique suffix of `input_len` tokens."""
    maker = _PromptMaker(pool, rng_for(seed, STREAM_DATASET), tokenizer)
    prefix = maker.make(prefix_len, as_text) if prefix_len else Turn("" if as_text else [], 0)
    sessions = []
    for i in range(num):
        suffix = maker.make(input_len, as_text)
        prompt: Prompt
        if isinstance(prefix.prompt, str):
            assert isinstance(suffix.prompt, str)
            prompt = prefix.prompt + suffix.prompt  # words carry their leading space: no merge at the seam
        else:
            assert isinstance(suffix.prompt, list)
            prompt = prefix.prompt + suffix.prompt
        sessions.append(Session(i, (Turn(prompt, prefix.prompt_len + suffix.prompt_len),)))
    return sessions


def multi_turn_dataset(
    pool: WordPool,
    num: int,
    num_turns: int,
    system_len: int,
    input_len: int,
    seed: int,
    tokenizer: TextTokenizer | None = None,
) -> list[Session]:
    """`num` conversations of `num_turns` user messages of `input_len` tokens after a shared system prompt."""
    maker = _PromptMaker(pool, rng_for(seed, STREAM_DATASET), tokenizer)
    system = maker.make(system_len, as_text=True) if system_len else None
    return [
        Session(
            i,
            tuple(maker.make(input_len, as_text=True) for _ in range(num_turns)),
            system=None if system is None else str(system.prompt),
            system_len=0 if system is None else system.prompt_len,
        )
        for i in range(num)
    ]


def build_dataset(
    kind: str,
    pool: WordPool,
    *,
    num: int,
    input_len: int,
    seed: int,
    prefix_len: int = 0,
    num_turns: int = 1,
    as_text: bool = False,
    tokenizer: TextTokenizer | None = None,
) -> list[Session]:
    """The sessions of dataset `kind` (`random`, `shared-prefix` or `multi-turn`)."""
    if kind == "random":
        return random_dataset(pool, num, input_len, seed, as_text, tokenizer)
    if kind == "shared-prefix":
        return shared_prefix_dataset(pool, num, prefix_len, input_len, seed, as_text, tokenizer)
    if kind == "multi-turn":
        return multi_turn_dataset(pool, num, num_turns, prefix_len, input_len, seed, tokenizer)
    raise ValueError(f"unknown dataset {kind!r}")


def chat_messages(session: Session, turn: int, answers: Sequence[str]) -> list[dict[str, str]]:
    """Messages of `turn`: system prompt, then every earlier user message and the server's answer to it."""
    if len(answers) < turn:
        raise ValueError(f"turn {turn} needs the answers of the {turn} turns before it")
    messages = [{"role": "system", "content": session.system}] if session.system is not None else []
    for t in range(turn + 1):
        messages.append({"role": "user", "content": str(session.turns[t].prompt)})
        if t < turn:
            messages.append({"role": "assistant", "content": answers[t]})
    return messages
