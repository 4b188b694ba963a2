"""Grammar-constrained decoding (structured output): a token bitmask per request, from xgrammar.

xgrammar was chosen by measurement (docs/benchmarks.md, "Grammar library"): the cheapest mask per decode
step at batch 1 and 32 and a compile of a few ms per schema. It stays behind this module's narrow surface:

    grammars = GrammarCompilerCache.from_tokenizer_json(path, vocab_size=V, stop_token_ids=eos)
    state = grammars.new_state(StructuredSpec(kind=StructuredKind.JSON_SCHEMA, spec=schema_text))
    mask = allocate_bitmask(batch, V)
    state.fill(mask, row)          # before sampling: the tokens allowed next
    apply_bitmask(logits, mask, rows)   # disallowed logits → -inf (rows: the constrained rows)
    state.accept(token)            # after sampling; False = the token broke the grammar (a bug upstream)

Who calls what: the model runner owns one `GrammarState` per constrained request (like its sampling
generators), fills the mask rows of a step's constrained requests, applies them to the logits just before
sampling, and feeds every sampled token back in order. With asynchronous scheduling the runner still sees
each request's tokens in order (it samples them), so no rollback is needed. A state that has reached the
end of its grammar allows only the stop tokens: the request then ends with its EOS.

Compiled grammars are cached by (kind, spec) with a byte bound, so a schema used by many requests compiles
once per engine.
"""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import torch

__all__ = [
    "GrammarCompilerCache",
    "GrammarState",
    "StructuredKind",
    "StructuredSpec",
    "allocate_bitmask",
    "apply_bitmask",
]


# Whitespace between JSON tokens is free for the model (it may pretty-print), but a run of it is bounded:
# a model that keeps choosing whitespace would otherwise never end its object (a known failure of
# unbounded JSON grammars).
MAX_WHITESPACE = 32
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"  # as xgrammar prints it: any but quote, backslash, CR, LF
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"  # and no control character either


class StructuredKind(enum.StrEnum):
    JSON_OBJECT = "json_object"  # any JSON object (response_format {"type": "json_object"})
    JSON_SCHEMA = "json_schema"  # a JSON schema, strictly (response_format json_schema, forced tool calls)
    REGEX = "regex"
    EBNF = "ebnf"  # a GBNF/EBNF grammar


class StructuredSpec(msgspec.Struct, frozen=True, kw_only=True):
    kind: StructuredKind
    spec: str = ""  # the schema (JSON text), regex or grammar; empty for JSON_OBJECT


class StructuredOutputError(ValueError):
    """The spec does not compile (a bad schema, regex or grammar): the client's error, a 400."""


def _vocab_type(tokenizer_json: dict[str, Any]) -> tuple[Any, bool]:
    """xgrammar's vocabulary type, read from tokenizer.json's decoder as transformers' loader would."""
    import xgrammar as xgr

    decoder = tokenizer_json.get("decoder") or {}
    decoders = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in types:
        # SentencePiece-style: a Metaspace prepended to the first word.
        pre = tokenizer_json.get("pre_tokenizer") or {}
        prepend = pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"
        prepend = prepend or any(d.get("type") == "Strip" and d.get("start") for d in decoders)
        return xgr.VocabType.BYTE_FALLBACK, prepend
    return xgr.VocabType.RAW, False


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._m.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        """The grammar ended and a stop token was accepted."""
        return bool(self._m.is_terminated())


class GrammarCompilerCache:
    def __init__(self, tokenizer_info: Any, *, cache_limit_bytes: int = 256 << 20, max_threads: int = 2):
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = tokenizer_info.vocab_size
        self._compiler = xgr.GrammarCompiler(
            tokenizer_info, max_threads=max_threads, cache_enabled=True, cache_limit_bytes=cache_limit_bytes
        )

    @classmethod
    def from_tokenizer_json(
        cls, path: str | os.PathLike[str], *, vocab_size: int, stop_token_ids: list[int], **kw: Any
    ) -> GrammarCompilerCache:
        """From a model folder's tokenizer.json (no transformers needed). `vocab_size` is the model's
        (logits) size, which may exceed the tokenizer's: the extra ids are never allowed."""
        import xgrammar as xgr

        data = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab: dict[str, int] = dict(data["model"]["vocab"])
        for added in data.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
        for piece, i in vocab.items():
            encoded[i] = piece
        vocab_type, prepend = _vocab_type(data)
        info = xgr.TokenizerInfo(
            encoded,
            vocab_type,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_token_ids),
            add_prefix_space=prepend,
        )
        return cls(info, **kw)

    def compile(self, spec: StructuredSpec) -> Any:
        try:
            if spec.kind is StructuredKind.JSON_OBJECT:
                # Any object, with the same whitespace bound as schemas (the built-in JSON grammar has none).
                return self._compile_json('{"type": "object"}', strict=False)
            if spec.kind is StructuredKind.JSON_SCHEMA:
                return self._compile_json(spec.spec, strict=True)
            if spec.kind is StructuredKind.REGEX:
                return self._compiler.compile_regex(spec.spec)
            return self._compiler.compile_grammar(spec.spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise StructuredOutputError(f"invalid {spec.kind.value}: {exc}") from None

    def _compile_json(self, schema: str, *, strict: bool) -> Any:
        """A JSON schema's grammar, with every string character class made JSON-legal.

        xgrammar (0.2.9) writes length-bounded strings (`maxLength`) as `[^"\\\r\n]{0,n}`, which lets
        control characters U+0000-U+001F through unescaped (a tab, say): `json.loads` refuses such output,
        as RFC 8259 does. Its own unbounded string rule already excludes them, so the fix is to use that
        class everywhere: the grammar is printed, the class rewritten, and the text compiled (found by the
        random-schema property test)."""
        grammar = self._xgr.Grammar.from_json_schema(
            schema, strict_mode=strict, max_whitespace_cnt=MAX_WHITESPACE
        )
        return self._compiler.compile_grammar(str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))

    def new_state(self, spec: StructuredSpec) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(self.compile(spec)))


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(batch, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Disallowed tokens' logits → -inf, in place, for `rows` of `logits` (bitmask row i ↔ logits row i)."""
    import xgrammar as xgr

    vocab = logits.shape[-1]
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=rows)
