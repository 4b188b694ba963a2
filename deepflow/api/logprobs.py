"""Log-probabilities in the two OpenAI formats, from the engine's per-token `Logprobs`.

A byte-level BPE token can hold part of a UTF-8 character, so decoding tokens one at a time loses bytes.
OpenAI's chat format carries each token's exact `bytes`; we recover them from the vocabulary (GPT-2 byte
alphabet, SentencePiece `<0xNN>` byte fallback) and show the token text with replacement characters.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Sequence
from typing import Any

from deepflow.api.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from deepflow.engine.request import Logprobs
from deepflow.engine.tokenizer import Tokenizer


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: the printable character that stands for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _decoder_types(config: Any) -> set[str]:
    """Every decoder type named in tokenizer.json's `decoder` (a Sequence nests others)."""
    if not isinstance(config, dict):
        return set()
    types = {str(config.get("type"))}
    for child in config.get("decoders") or []:
        types |= _decoder_types(child)
    return types


class TokenDecoder:
    """Exact bytes and display text of single tokens, cached: the same ids recur in every response."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        backend = tokenizer.backend
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._special = tokenizer.all_special_ids
        types = _decoder_types(json.loads(backend.to_str()).get("decoder"))
        self._byte_level = "ByteLevel" in types
        self._byte_fallback = "ByteFallback" in types or "Metaspace" in types
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._token_bytes(token_id)
        return cached

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        if self._byte_fallback:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()


def _finite(value: float) -> float:
    """JSON has no -inf; a token the sampler ruled out gets the lowest finite float instead."""
    return value if math.isfinite(value) else -9999.0


class CompletionLogprobsBuilder:
    """Legacy completions format for one choice, across stream chunks: `text_offset` keeps counting."""

    def __init__(self, decoder: TokenDecoder, start_offset: int, skip_special_tokens: bool) -> None:
        self._decoder = decoder
        self._offset = start_offset
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def build(self, logprobs: Sequence[Logprobs]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        d = self._decoder
        for lp in logprobs:
            out.tokens.append(d.text(lp.token_id))
            out.token_logprobs.append(_finite(lp.logprob))
            top = {d.text(i): _finite(v) for i, v in zip(lp.top_ids, lp.top_logprobs, strict=False)}
            top.setdefault(d.text(lp.token_id), _finite(lp.logprob))  # the sampled token is always listed
            out.top_logprobs.append(top)
            out.text_offset.append(self._offset)
            if not (self._skip_special and d.is_special(lp.token_id)):
                self._offset += len(self._utf8.decode(d.bytes(lp.token_id)))
        return out


def chat_logprobs(decoder: TokenDecoder, logprobs: Sequence[Logprobs]) -> ChatLogprobs:
    """Chat format: each token with its bytes and its `top_logprobs` alternatives."""
    content = []
    for lp in logprobs:
        top = [
            TopLogprob(token=decoder.text(i), logprob=_finite(v), bytes=list(decoder.bytes(i)))
            for i, v in zip(lp.top_ids, lp.top_logprobs, strict=False)
        ]
        content.append(
            TokenLogprob(
                token=decoder.text(lp.token_id),
                logprob=_finite(lp.logprob),
                bytes=list(decoder.bytes(lp.token_id)),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)
