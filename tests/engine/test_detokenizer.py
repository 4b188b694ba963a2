"""Streaming detokenization: deltas add up to the full decode, never split a character, never leak a stop."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepflow.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from deepflow.engine.sampling_params import SamplingParams
from deepflow.engine.tokenizer import Tokenizer
from tests.engine.tokenizer_support import build_tokenizer_dir, hypothesis_settings


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(build_tokenizer_dir(tmp_path_factory))


class CharTokenizer:
    """One token per character (id = code point): isolates the stop-string logic from BPE."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def _chunks(ids: Sequence[int], cuts: Sequence[int]) -> list[list[int]]:
    """Split `ids` at the given positions (any order, duplicates and out-of-range ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(ids)})
    bounds = [0, *points, len(ids)]
    return [list(ids[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def _stream(detok: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> tuple[list[str], str | None]:
    """Feed chunks like an engine would; return every delta (the flush last) and the stop reason."""
    deltas: list[str] = []
    for chunk in chunks:
        update = detok.update(chunk)
        deltas.append(update.delta_text)
        if update.stop_reason is not None:
            return deltas, update.stop_reason
    deltas.append(detok.flush())
    return deltas, detok.stop_reason


def _reference_stop(
    text: str, chunk_ends: Sequence[int], stops: Sequence[str], min_tokens: int
) -> tuple[int, str] | None:
    """Character-at-a-time oracle: first position where some stop string completes while checks are on.

    `chunk_ends[k]` is the text length after chunk k (char tokenizer: also the token count).
    """
    for end in range(1, len(text) + 1):
        tokens_so_far = next(e for e in chunk_ends if e >= end)
        if tokens_so_far < min_tokens:
            continue
        matches = [s for s in stops if text[:end].endswith(s)]
        if matches:
            stop = max(matches, key=len)
            return end - len(stop), stop
    return None


# -- UTF-8 and incremental decoding -----------------------------------------------------------------------

UNICODE_TEXTS = [
    "Hello 👋🏽 世界! café — 🧑‍🤝‍🧑 done",
    "日本語のテキストと中文和한국어",
    "🇫🇷🇩🇪🇯🇵 flags and ❤️‍🔥 sequences",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 and \U0001f9ea\U0001f9ec",
    "plain ascii text, with punctuation; and numbers 12345.",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_one_token_at_a_time_never_emits_replacement_char(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()  # really splits characters
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), skip_special_tokens=True)
    deltas = [detok.update([i]).delta_text for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert detok.flush() == ""
    assert "".join(deltas) == detok.output_text == text == tok.decode(ids)


text_strategy = st.lists(
    st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(["👋", "🏽", "\u200d", "世", "界", "é", "ß", " ", "\n", "中文", "🧑‍🤝‍🧑"]),
    ),
    max_size=30,
).map("".join)


@hypothesis_settings(200)
@given(text=text_strategy, prompt=text_strategy, cuts=st.lists(st.integers(0, 80), max_size=12))
def test_streamed_valid_text_equals_decode(tok: Tokenizer, text: str, prompt: str, cuts: list[int]) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), skip_special_tokens=True)
    deltas, stop = _stream(detok, _chunks(ids, cuts))
    assert stop is None
    assert "".join(deltas) == detok.output_text == tok.decode(ids)
    if "\ufffd" not in tok.decode(ids):  # (this GGUF vocab lacks a few byte tokens, e.g. for U+40000)
        assert all("\ufffd" not in d for d in deltas)


@hypothesis_settings(300)
@given(
    ids=st.lists(st.integers(0, 49151), max_size=40),
    prompt=st.lists(st.integers(0, 49151), max_size=8),
    cuts=st.lists(st.integers(0, 40), max_size=40),
    skip_special_tokens=st.booleans(),
)
def test_streamed_random_ids_equal_decode(
    tok: Tokenizer, ids: list[int], prompt: list[int], cuts: list[int], skip_special_tokens: bool
) -> None:
    """Arbitrary ids, including lone UTF-8 continuation bytes and special tokens; final text = decode(all)."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas, _ = _stream(detok, _chunks(ids, cuts))
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert all(not d.endswith("\ufffd") for d in deltas[:-1])  # only the final flush may end mid-character


def test_byte_tokens_wait_for_complete_character(tok: Tokenizer) -> None:
    emoji_ids = tok.encode("🤖")
    assert len(emoji_ids) > 1
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    for i in emoji_ids[:-1]:
        assert detok.update([i]) == DetokenizerUpdate("")
    assert detok.update(emoji_ids[-1:]) == DetokenizerUpdate("🤖")


def test_flush_emits_truncated_character(tok: Tokenizer) -> None:
    """Generation cut by max_tokens mid-character: the final text is what decode() gives."""
    ids = tok.encode("ok 🤖")[:-1]
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    streamed = "".join(detok.update([i]).delta_text for i in ids)
    assert streamed == "ok"
    assert streamed + detok.flush() == tok.decode(ids)
    assert detok.finished
    assert detok.update(tok.encode("more")) == DetokenizerUpdate("")


def test_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<|im_end|> there")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        deltas, _ = _stream(detok, [[i] for i in ids])
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_window_stays_small(tok: Tokenizer) -> None:
    """O(1) per token: the decoded window does not grow with the output."""
    ids = tok.encode("word " * 2000)
    calls: list[int] = []

    class CountingTokenizer:
        def decode(self, window: Sequence[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(window))
            return tok.decode(window, skip_special_tokens)

    detok = IncrementalDetokenizer(CountingTokenizer(), [], skip_special_tokens=True)
    for i in ids:
        detok.update([i])
    assert detok.flush() == ""
    assert detok.output_text == tok.decode(ids)
    assert max(calls) <= 3


# -- stop strings -----------------------------------------------------------------------------------------

stop_alphabet = st.sampled_from("ab c\n")


@hypothesis_settings(500)
@given(
    text=st.text(alphabet=stop_alphabet, max_size=40),
    stops=st.lists(st.text(alphabet=stop_alphabet, min_size=1, max_size=5), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=40),
    include=st.booleans(),
    min_tokens=st.integers(0, 20),
)
def test_stop_strings_never_leak(
    text: str, stops: list[str], cuts: list[int], include: bool, min_tokens: int
) -> None:
    """Whatever the chunking, the stream is always a prefix of the final text, which the oracle predicts."""
    tok = CharTokenizer()
    ids = tok.encode(text)
    chunks = _chunks(ids, cuts)
    detok = IncrementalDetokenizer(
        tok, [], stop=stops, include_stop_str_in_output=include, min_tokens=min_tokens
    )
    deltas, reason = _stream(detok, chunks)

    ends = [sum(len(c) for c in chunks[: k + 1]) for k in range(len(chunks))]
    expected = _reference_stop(text, ends, stops, min_tokens)
    if expected is None:
        final, expected_reason = text, None
    else:
        index, expected_reason = expected
        final = text[: index + len(expected_reason)] if include else text[:index]
    assert reason == expected_reason
    assert "".join(deltas) == detok.output_text == final
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert final.startswith(streamed)
    if min_tokens == 0 and not include:
        assert not any(s in final for s in stops)


@hypothesis_settings(200)
@given(
    data=st.data(),
    pieces=st.lists(st.sampled_from(["a", " b", "\n", "世", "👋", "c.", "User:"]), min_size=1, max_size=20),
    include=st.booleans(),
)
def test_stop_strings_on_real_tokens(
    tok: Tokenizer, data: st.DataObject, pieces: list[str], include: bool
) -> None:
    """Stop strings cut from the text itself, often spanning token and UTF-8 boundaries."""
    text = "".join(pieces)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 6))]
    ids = tok.encode(text)
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=len(ids)))
    detok = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=include)
    deltas, reason = _stream(detok, _chunks(ids, cuts))
    index = text.index(stop)
    assert reason == stop
    assert "".join(deltas) == (text[: index + len(stop)] if include else text[:index])
    if not include:
        assert all(stop not in "".join(deltas[: k + 1]) for k in range(len(deltas)))


def test_stop_spanning_tokens(tok: Tokenizer) -> None:
    text = "The answer is 42.\nUser: what next?"
    ids = tok.encode(text)
    stop = "\nUser:"
    assert all(stop not in tok.decode([i]) for i in ids)  # no single token holds it

    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    deltas, reason = _stream(detok, [[i] for i in ids])
    assert reason == stop
    assert "".join(deltas) == detok.output_text == "The answer is 42."
    assert all("\n" not in d for d in deltas)

    detok = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str_in_output=True)
    deltas, reason = _stream(detok, [[i] for i in ids])
    assert reason == stop
    assert detok.output_text == "The answer is 42.\nUser:"


def test_multiple_stops_first_completed_wins(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four")
    detok = IncrementalDetokenizer(tok, [], stop=["four", "two", "xyz"])
    _, reason = _stream(detok, [[i] for i in ids])
    assert reason == "two"
    assert detok.output_text == "one "
    # All at once, the string that completes first still wins over an earlier-starting longer one.
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=["abcd", "bc"])
    update = detok.update(CharTokenizer().encode("xabcdy"))
    assert update == DetokenizerUpdate("xa", "bc")


def test_stop_after_tokens_ignored(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["!"])
    assert detok.update(tok.encode("Hi! more")) == DetokenizerUpdate("Hi", "!")
    assert detok.finished
    assert detok.update(tok.encode("even more")) == DetokenizerUpdate("")
    assert detok.flush() == ""
    assert detok.output_text == "Hi"


def test_hold_back_and_flush(tok: Tokenizer) -> None:
    """Text that might start a stop string is held until it cannot, and flushed on EOS/length."""
    detok = IncrementalDetokenizer(tok, [], stop=["STOP!"])
    assert detok.update(tok.encode("Hello world")).delta_text == "Hello w"
    assert detok.update(tok.encode(" ST")).delta_text == "orl"
    assert detok.flush() == "d ST"
    assert detok.stop_reason is None
    assert detok.output_text == "Hello world ST"


def test_min_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("a. b. c. d.")  # 'a', '.', ' b', '.', ' c', '.', ...
    params = SamplingParams(stop=["."], min_tokens=3)
    detok = IncrementalDetokenizer.from_params(tok, [], params)
    _, reason = _stream(detok, [[i] for i in ids])
    assert reason == "."
    assert detok.output_text == "a. b"  # the first '.' came at token 2 < min_tokens and is kept
    # One update carrying the tokens past min_tokens checks all of its text.
    detok = IncrementalDetokenizer(tok, [], stop=["."], min_tokens=3)
    assert detok.update(ids[:4]) == DetokenizerUpdate("a", ".")


def test_from_params(tok: Tokenizer) -> None:
    params = SamplingParams(stop=["x"], include_stop_str_in_output=True, skip_special_tokens=False)
    detok = IncrementalDetokenizer.from_params(tok, tok.encode("p"), params)
    _, reason = _stream(detok, [[i] for i in tok.encode("<|im_start|>ax b")])
    assert (reason, detok.output_text) == ("x", "<|im_start|>ax")
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=[""])
