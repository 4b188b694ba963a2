"""Dataset builders: exact lengths, determinism, a really shared prefix, growing multi-turn histories."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepflow.bench.datasets import (
    Session,
    Turn,
    build_dataset,
    chat_messages,
    multi_turn_dataset,
    random_dataset,
    shared_prefix_dataset,
)
from deepflow.bench.tokens import LocalTokenizer, WordPool, build_word_pool
from tests.bench.fake_server import fake_token_ids


class WhitespaceTokenizer:
    """One token per word, like the fake server's /tokenize."""

    description = "whitespace"

    def encode(self, text: str) -> list[int]:
        return fake_token_ids(text)


class SplitsTheTokenizer(WhitespaceTokenizer):
    """Counts the word 'the' as two tokens, so text prompts must be fitted by adding/dropping words."""

    def encode(self, text: str) -> list[int]:
        return [i for w in text.split() for i in ([7, 7] if w == "the" else fake_token_ids(w))]


@pytest.fixture(scope="module")
def pool() -> WordPool:
    return build_word_pool(WhitespaceTokenizer())


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> LocalTokenizer:
    return LocalTokenizer(smollm2_dir)


def test_word_pool_words_are_single_tokens(smollm2: LocalTokenizer) -> None:
    pool = build_word_pool(smollm2)
    assert len(pool) > 300
    assert len(set(pool.ids)) == len(pool)
    for token_id, text in zip(pool.ids, pool.texts, strict=True):
        assert smollm2.encode(text) == [token_id]


def test_word_pool_refuses_a_tokenizer_without_word_tokens() -> None:
    class Chars(WhitespaceTokenizer):
        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="--tokenizer"):
        build_word_pool(Chars())


@pytest.mark.parametrize("input_len", [1, 7, 256, 1000])
def test_random_token_id_prompts_have_exact_length(pool: WordPool, input_len: int) -> None:
    sessions = random_dataset(pool, num=20, input_len=input_len, seed=3)
    assert [s.index for s in sessions] == list(range(20))
    for s in sessions:
        (turn,) = s.turns
        assert isinstance(turn.prompt, list) and len(turn.prompt) == turn.prompt_len == input_len
        assert set(turn.prompt) <= set(pool.ids)


@pytest.mark.parametrize("input_len", [1, 33, 512])
def test_random_text_prompts_have_exact_length_on_a_real_tokenizer(
    smollm2: LocalTokenizer, input_len: int
) -> None:
    pool = build_word_pool(smollm2)
    for s in random_dataset(pool, num=10, input_len=input_len, seed=1, as_text=True, tokenizer=smollm2):
        (turn,) = s.turns
        assert isinstance(turn.prompt, str)
        assert len(smollm2.encode(turn.prompt)) == turn.prompt_len == input_len


def test_text_prompts_are_fitted_when_words_split(pool: WordPool) -> None:
    tokenizer = SplitsTheTokenizer()
    for s in random_dataset(pool, num=50, input_len=200, seed=0, as_text=True, tokenizer=tokenizer):
        (turn,) = s.turns
        assert isinstance(turn.prompt, str)
        assert len(tokenizer.encode(turn.prompt)) == turn.prompt_len == 200


def test_datasets_are_deterministic_in_the_seed(pool: WordPool) -> None:
    for kind in ("random", "shared-prefix", "multi-turn"):
        build = dict(kind=kind, num=8, input_len=16, prefix_len=32, num_turns=3)
        a = build_dataset(pool=pool, seed=5, **build)  # type: ignore[arg-type]
        b = build_dataset(pool=pool, seed=5, **build)  # type: ignore[arg-type]
        c = build_dataset(pool=pool, seed=6, **build)  # type: ignore[arg-type]
        assert a == b
        assert a != c
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("sharegpt", pool, num=1, input_len=1, seed=0)


@pytest.mark.parametrize("as_text", [False, True])
def test_shared_prefix_is_really_shared(pool: WordPool, as_text: bool) -> None:
    tokenizer = WhitespaceTokenizer()
    sessions = shared_prefix_dataset(
        pool, num=64, prefix_len=1024, input_len=32, seed=0, as_text=as_text, tokenizer=tokenizer
    )
    ids = [
        tokenizer.encode(t.prompt) if isinstance(t.prompt, str) else t.prompt
        for s in sessions
        for t in s.turns
    ]
    assert all(len(p) == 1024 + 32 for p in ids)
    assert all(s.turns[0].prompt_len == 1024 + 32 for s in sessions)
    assert len({tuple(p[:1024]) for p in ids}) == 1  # one prefix
    assert len({tuple(p[1024:]) for p in ids}) == 64  # distinct suffixes


def test_multi_turn_conversations_share_a_system_prompt(pool: WordPool) -> None:
    tokenizer = WhitespaceTokenizer()
    sessions = multi_turn_dataset(
        pool, num=5, num_turns=4, system_len=100, input_len=20, seed=0, tokenizer=tokenizer
    )
    assert len({s.system for s in sessions}) == 1
    for s in sessions:
        assert s.system is not None and len(tokenizer.encode(s.system)) == s.system_len == 100
        assert len(s.turns) == 4
        assert all(isinstance(t.prompt, str) and len(tokenizer.encode(t.prompt)) == 20 for t in s.turns)
    assert multi_turn_dataset(pool, num=1, num_turns=1, system_len=0, input_len=3, seed=0)[0].system is None


def test_multi_turn_history_grows_with_the_answers() -> None:
    session = Session(0, (Turn("u0", 1), Turn("u1", 1), Turn("u2", 1)), system="sys", system_len=1)
    answers = ["a0", "a1"]
    histories = [chat_messages(session, t, answers[:t]) for t in range(3)]
    assert histories[0] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "u0"}]
    for t in range(2):
        # turn t+1's prompt = turn t's prompt + its answer + the new user message
        assert histories[t + 1] == [
            *histories[t],
            {"role": "assistant", "content": answers[t]},
            {"role": "user", "content": session.turns[t + 1].prompt},
        ]
    with pytest.raises(ValueError, match="answers"):
        chat_messages(session, 2, ["a0"])
