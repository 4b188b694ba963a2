"""Incremental detokenization with stop strings, for streaming one request's output text.

Decoding the whole output after every token is O(n) per token, and decoding tokens one by one is wrong: a
byte-level BPE token can hold part of a UTF-8 character, and some decoders treat a sequence's first token
specially. So, like vLLM and HF TGI, we decode a small window `ids[prefix_offset:]` and emit only what it adds
beyond `ids[prefix_offset:read_offset]`, waiting while the window ends in an incomplete character.

Stop strings are then matched on the new text plus the last `max(len(stop)) - 1` characters before it, and
that many characters are held back from the stream, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from deepflow.engine.sampling_params import SamplingParams

__all__ = ["DetokenizerUpdate", "IncrementalDetokenizer"]

# Prompt tokens decoded as context before the first output token (vLLM uses the same number): enough for
# decoders whose output for a token depends on what precedes it, e.g. SentencePiece's leading space.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True, slots=True)
class DetokenizerUpdate:
    """Result of feeding tokens: text safe to stream now, and the stop string that ended the output."""

    delta_text: str
    stop_reason: str | None = None


class IncrementalDetokenizer:
    """Turns one request's output token ids into streamed text deltas, applying stop strings.

    Invariants: the concatenation of every `delta_text` and of `flush()` is `output_text`; without a stop
    match it equals the window decode of all output ids (for byte-level BPE tokenizers exactly
    `tokenizer.decode(output_ids)`); with one, it is that text cut before the stop string (after it with
    `include_stop_str_in_output`). No delta ever ends in a partial UTF-8 character.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # A prompt cut inside a character would make its context text change as output arrives; drop it.
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_output_tokens = 0

        self._stop = tuple(dict.fromkeys(stop))  # dedupe, keep order
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        max_stop = max((len(s) for s in self._stop), default=0)
        self._lookback_len = max(max_stop - 1, 0)
        # With the stop string kept in the output, nothing needs hiding: a match always ends in new text.
        self._hold_len = 0 if include_stop_str_in_output else self._lookback_len
        self._lookback = ""  # last `_lookback_len` chars of all decoded text so far
        self._held = ""  # decoded text not streamed yet; a suffix of `_lookback`

        self._out_parts: list[str] = []
        self._stop_reason: str | None = None
        self._finished = False

    @classmethod
    def from_params(
        cls, tokenizer: _Decoder, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> IncrementalDetokenizer:
        return cls(
            tokenizer,
            prompt_token_ids,
            params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    # -- public state ---------------------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """Everything streamed so far (after `flush()` or a stop: the final text)."""
        if len(self._out_parts) > 1:
            self._out_parts = ["".join(self._out_parts)]
        return self._out_parts[0] if self._out_parts else ""

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    @property
    def finished(self) -> bool:
        """True after a stop string matched or `flush()` ran; further tokens are ignored."""
        return self._finished

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    # -- feeding --------------------------------------------------------------------------------------------

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Add newly sampled ids; return the text that may be streamed now and any matched stop string.

        Once finished (stop matched or flushed), ids are ignored: with overlapped scheduling a token may
        still arrive after the stop.
        """
        if self._finished or not new_token_ids:
            return DetokenizerUpdate("")
        self._ids.extend(new_token_ids)
        self._num_output_tokens += len(new_token_ids)
        return self._push(self._decode_new(final=False))

    def flush(self) -> str:
        """Finish (EOS, length, abort): emit held-back text and any trailing incomplete character."""
        if self._finished:
            return ""
        delta = self._push(self._decode_new(final=True)).delta_text
        if not self._finished:
            delta += self._held
            self._emit(self._held)
            self._held = ""
            self._finished = True
        return delta

    # -- internals ------------------------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        """Text added by ids past `read_offset`; '' while it ends mid-character (unless `final`)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Drop ids before the window so memory and slicing stay O(window).
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return new_text[len(prefix_text) :]

    def _emit(self, text: str) -> None:
        if text:
            self._out_parts.append(text)

    def _push(self, text: str) -> DetokenizerUpdate:
        """Run new text through the stop-string check and the hold-back buffer."""
        if not text:
            return DetokenizerUpdate("")
        buf = self._lookback + text
        new_start = len(self._lookback)
        unsent_start = new_start - len(self._held)
        match = self._find_stop(buf, new_start) if self._num_output_tokens >= self._min_tokens else None
        if match is not None:
            index, stop = match
            cut = index + len(stop) if self._include_stop else index
            delta = buf[unsent_start : max(cut, unsent_start)]
            self._emit(delta)
            self._held = ""
            self._stop_reason = stop
            self._finished = True
            return DetokenizerUpdate(delta, stop)
        if self._lookback_len:
            self._lookback = buf[-self._lookback_len :]
        unsent = buf[unsent_start:]
        split = max(len(unsent) - self._hold_len, 0)
        delta, self._held = unsent[:split], unsent[split:]
        self._emit(delta)
        return DetokenizerUpdate(delta)

    def _find_stop(self, buf: str, new_start: int) -> tuple[int, str] | None:
        """The stop string occurrence that completes first among those ending in the new text.

        Earliest end (ties: the longer, earlier-starting string) gives the same answer whatever the token
        boundaries, as if text arrived one character at a time. Earlier text was already checked.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop:
            index = buf.find(stop, max(new_start - len(stop) + 1, 0))
            if index < 0:
                continue
            candidate = (index + len(stop), index, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])
