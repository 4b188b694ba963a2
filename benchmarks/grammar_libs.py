"""Which grammar library for schema-constrained decoding: xgrammar, llguidance or outlines-core, measured.

For each JSON schema: the compile time (the first request with a new schema pays it), then the per-step
cost of the token mask for a batch of 1 and of 32 sequences, each walking a valid instance of the schema
token by token (the mask is computed, then the instance's next token accepted) — the work a constrained
sampler adds to every decode step. SmolLM2's tokenizer (49,152 tokens). One process, libraries interleaved
per schema, best of `--repeats`.

    .venv/bin/python benchmarks/grammar_libs.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "owner": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                "required": ["name", "email"],
                "additionalProperties": False,
            },
            "kind": {"enum": ["alpha", "beta", "gamma"]},
            "score": {"type": "number"},
        },
        "required": ["id", "tags", "owner", "kind", "score"],
        "additionalProperties": False,
    },
}

INSTANCES = {
    "flat": {"name": "Ada Lovelace", "age": 36, "ok": True},
    "nested": {
        "id": "abc-123",
        "tags": ["x", "yy", "zzz"],
        "owner": {"name": "Grace Hopper", "email": "grace@example.com"},
        "kind": "beta",
        "score": 0.75,
    },
}


def hf_tokenizer():
    from transformers import AutoTokenizer

    from deepflow.weights.embedded import prepare_embedded_model

    return AutoTokenizer.from_pretrained(str(prepare_embedded_model(progress=False)))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.vocab = len(tok)

    def compile(self, schema: str):
        # A new compiler per schema: its cache would otherwise hide the compile time on repeats.
        return self.xgr.GrammarCompiler(self.info, cache_enabled=False).compile_json_schema(schema)

    def matchers(self, compiled, n):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def step(self, matchers, bitmask, tokens):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        for m, t in zip(matchers, tokens, strict=True):
            assert m.accept_token(t), "xgrammar refused a token of a valid instance"


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, parallel: bool = False) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tok)
        self.vocab = self.tokenizer.vocab_size
        self.executor = llguidance.LLExecutor()
        self.parallel = parallel
        self.name = "llguidance (parallel fill)" if parallel else "llguidance"

    def compile(self, schema: str):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        m = self.ll.LLMatcher(self.tokenizer, grammar)  # llguidance compiles lazily: build one matcher
        assert not m.is_error(), m.get_error()
        return grammar

    def matchers(self, grammar, n):
        return [self.ll.LLMatcher(self.tokenizer, grammar) for _ in range(n)]

    def bitmask(self, n):
        return self.llt.allocate_token_bitmask(n, self.vocab)

    def step(self, matchers, bitmask, tokens):
        if len(matchers) == 1 or not self.parallel:
            for i, m in enumerate(matchers):
                self.llt.fill_next_token_bitmask(m, bitmask, i)
        else:  # its thread pool fills the batch in parallel, off the GIL
            self.llt.fill_next_token_bitmask_par(
                self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
            )
        for m, t in zip(matchers, tokens, strict=True):
            assert m.consume_token(t), f"llguidance refused a token of a valid instance: {m.get_error()}"


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok) -> None:
        import outlines_core

        self.oc = outlines_core
        vocab: dict[str, list[int]] = {}
        eos = tok.eos_token_id
        for piece, i in tok.get_vocab().items():
            if i != eos:  # byte-level BPE pieces (Ġ = space) → the text they stand for
                vocab.setdefault(tok.convert_tokens_to_string([piece]), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, vocab)
        self.vocab = len(tok)

    def compile(self, schema: str):
        regex = self.oc.json_schema.build_regex_from_schema(schema)
        return self.oc.Index(regex, self.vocabulary)

    def matchers(self, index, n):
        return [self.oc.Guide(index) for _ in range(n)]

    def bitmask(self, n):
        return torch.zeros(n, (self.vocab + 31) // 32, dtype=torch.int32)

    def step(self, matchers, bitmask, tokens):
        for i, g in enumerate(matchers):
            g.write_mask_into(bitmask[i].data_ptr(), bitmask[i].numel(), bitmask.element_size())
        for g, t in zip(matchers, tokens, strict=True):
            g.advance(t)


def run(lib, schema_name: str, token_ids: list[int], batch: int) -> tuple[float, float]:
    schema = json.dumps(SCHEMAS[schema_name])
    t0 = time.perf_counter()
    compiled = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    matchers = lib.matchers(compiled, batch)
    bitmask = lib.bitmask(batch)
    steps = []
    for t in token_ids:
        t1 = time.perf_counter()
        lib.step(matchers, bitmask, [t] * batch)
        steps.append(time.perf_counter() - t1)
    return compile_s, statistics.median(steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = hf_tokenizer()
    libs = []
    for cls in (XGrammar, LLGuidance, lambda t: LLGuidance(t, parallel=True), OutlinesCore):
        try:
            libs.append(cls(tok))
        except Exception as exc:
            print(f"{getattr(cls, 'name', cls)}: unavailable ({exc})")
    print("| schema | library | compile ms | mask+accept per step, batch 1 (µs) | batch 32 (µs) |")
    print("|---|---|---|---|---|")
    for name in SCHEMAS:
        ids = tok.encode(json.dumps(INSTANCES[name]), add_special_tokens=False)
        for lib in libs:
            best = {1: (float("inf"), float("inf")), 32: (float("inf"), float("inf"))}
            for _ in range(args.repeats):
                for batch in (1, 32):
                    c, s = run(lib, name, ids, batch)
                    best[batch] = (min(best[batch][0], c), min(best[batch][1], s))
            print(
                f"| {name} ({len(ids)} tokens) | {lib.name} | {best[1][0] * 1e3:.1f} | "
                f"{best[1][1] * 1e6:.0f} | {best[32][1] * 1e6:.0f} |"
            )


if __name__ == "__main__":
    main()
